"""The fake venv that the Makefile tests run make against: its ``bin/python`` answers ``-m finetune/extract/resize``
(and the run folder's base) with fast fakes that record each call; everything else goes to the real interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """\
#!{real}
import json, os, pathlib, sys
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:  # make install: nothing is installed
    sys.exit(0)
if args[:2] == ["-m", "venv"]:  # make install on a fresh clone: a venv whose python is this fake
    pathlib.Path(args[2], "bin").mkdir(parents=True)
    pathlib.Path(args[2], "bin", "python").write_text(pathlib.Path(__file__).read_text())
    pathlib.Path(args[2], "bin", "python").chmod(0o755)
    sys.exit(0)
if args[:1] != ["-m"] or args[1] not in ("finetune", "xlbake.batch.base_of", "extract", "resize"):
    os.execv({real!r}, [{real!r}, *args])
import yaml
stage, rest = args[1], args[2:]
opts, sets, flags, i = {{}}, [], [], 0
while i < len(rest):
    if rest[i] == "--set":
        sets.append(rest[i + 1]); i += 2
    elif rest[i] in ("--config", "--resume", "--base", "--tuned", "--dim", "--conv-dim", "--out", "--lora", "--rank",
                     "--size"):
        opts[rest[i]] = rest[i + 1]; i += 2
    else:
        flags.append(rest[i]); i += 1
if stage == "xlbake.batch.base_of":
    print(pathlib.Path(rest[0], "base.txt").read_text()); sys.exit(0)
if stage == "finetune":  # resolve the config as the real one does: the file (a preset, or a resolved one), then --set
    text = pathlib.Path(opts["--config"]).read_text()
    resolved = json.loads(text) if text.startswith("{{") else {{"preset": text, "sets": {{}}, "data": {{"roots": []}}}}
    for key, _, value in (s.partition("=") for s in sets):
        if key == "data.roots":
            resolved["data"]["roots"] = yaml.safe_load(value)
        elif key == "run_dir":
            resolved["run_dir"] = value
        else:
            resolved["sets"][key] = value
    run = resolved.get("run_dir")
else:
    run = None
if "--dry-run" in flags:
    print(json.dumps(resolved))
    sys.exit(0)
record = {{"stage": stage, **{{k.lstrip("-"): v for k, v in opts.items()}}, "flags": flags}}
record["gpu"] = os.environ.get("CUDA_VISIBLE_DEVICES")
with open(os.environ["FAKE_CALLS"], "a") as log:
    log.write(json.dumps(record) + "\\n")
fail_stage, _, fail_where = os.environ.get("FAKE_FAIL", "").partition(":")  # "extract" or "extract:<path part>"
fail = fail_stage == stage and fail_where in (run or opts["--out"])
if stage == "finetune":
    out = pathlib.Path(run)
    (out / "state").mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.yaml").write_text(json.dumps(resolved))
    if fail:
        print("Error: interrupted", file=sys.stderr); sys.exit(1)
    (out / "base.txt").write_text("/base.safetensors\\n")
    (out / "tuned.fp32.safetensors").write_text("tuned")
else:
    if fail:
        print(f"Error: {{opts['--out']}}: fake {{stage}} failure", file=sys.stderr); sys.exit(1)
    pathlib.Path(opts["--out"]).write_text(stage)
"""


def make_fake_venv(folder: Path) -> Path:
    """A venv folder whose bin/python fakes the stage commands; its install stamp is up to date."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(real=sys.executable))
    python.chmod(0o755)
    (folder / ".installed").touch()
    return folder


class Make:
    """Runs the repository's Makefile with the fake venv; ``calls()`` returns the stage calls since the last one."""

    def __init__(self, tmp_path: Path) -> None:
        self.venv = make_fake_venv(tmp_path / "venv")
        self.runs = tmp_path / "runs"
        self.log = tmp_path / "calls.jsonl"
        self.log.touch()
        self.seen = 0

    def __call__(self, *args: str, check: bool = True, fail: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "FAKE_CALLS": str(self.log), "FAKE_FAIL": fail}
        env.pop("MAKEFLAGS", None)
        command = ["make", "-C", str(REPO), "--no-print-directory", "-o", str(self.venv / ".installed")]
        command += [f"VENV={self.venv}", f"RUNS={self.runs}", *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def calls(self) -> list[str]:
        """New stage calls as short strings: "finetune --force", "extract 32", "resize 32->8"."""
        lines = self.log.read_text().splitlines()
        new, self.seen = lines[self.seen :], len(lines)
        out = []
        for call in map(json.loads, new):
            if call["stage"] == "finetune":
                out.append(
                    "finetune " + ("--resume " + call["resume"] if "resume" in call else " ".join(call["flags"]))
                )
            elif call["stage"] == "extract":
                out.append(f"extract {call['dim']}")
            else:
                target = call.get("rank") or call.get("size")
                out.append(f"resize {Path(call['lora']).stem.removeprefix('lora-dim')}->{target}")
        return out
