"""benchmarks/bench_extract.py's measurement setting: every method starts from its inputs in the page cache."""

import json
import subprocess
from pathlib import Path

from benchmarks import bench_extract


def test_each_method_reads_its_input_files_whole_before_its_worker_starts(tmp_path, monkeypatch):
    pair = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    for path in pair:
        path.write_bytes(b"x" * 100)
    events = []
    monkeypatch.setattr(bench_extract, "read_whole", lambda paths: events.append(("read", tuple(paths))) or 0.0)

    def worker(command, **_):
        events.append(("worker", command[command.index("--worker") + 1]))
        Path(command[command.index("--result") + 1]).write_text(json.dumps({"cpu": 1.0}))
        Path(command[command.index("--out") + 1]).write_bytes(b"lora")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench_extract.subprocess, "run", worker)
    args = bench_extract.parse_args(["--dim", "8"])
    for method in ("kohya", "fast"):
        bench_extract.run_method(method, pair, tmp_path, args, conv_dim=8)
    assert events == [("read", pair), ("worker", "kohya"), ("read", pair), ("worker", "fast")]
