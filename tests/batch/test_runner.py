"""xlbake batch: every concept's chain through make, failures isolated, GPU slots, the summary table and files."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fake_make import REPO, make_fake_venv
from safetensors.torch import save_file

from xlbake.batch import runner as batch
from xlbake.batch.cli import main
from xlbake.batch.runner import diagnose, parse_gpus, select_concepts
from xlbake.batch.summary import (
    ConceptResult,
    OutputFile,
    collect_outputs,
    read_summary,
    render_markdown,
    update_summary,
)
from xlbake.errors import ConfigError
from xlbake.fingerprint import fingerprint
from xlbake.lora.io import write_lora
from xlbake.sdxl.tensorfile import safetensors_data_hash

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def write_report(path: Path, kept: float, source: str | None = None) -> None:
    summary = {"source": source} if source else {"output": "dim32"}
    path.write_text(json.dumps({"summary": summary, "total": {"kept_energy": kept}}))


def safetensors_with_step(path: Path, step: int, train_seconds: float | None = None) -> None:
    meta = {"xlbake.global_step": str(step)} | ({"xlbake.train_seconds": str(train_seconds)} if train_seconds else {})
    header = json.dumps({"__metadata__": meta}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def extracted(path: Path, tuned: Path | str) -> None:
    """A LoRA as extract writes it: its header records the fingerprint of the tuned file it came from."""
    tuned_fp = fingerprint(tuned) if isinstance(tuned, Path) else tuned
    sources = json.dumps({"tuned": {"file": "tuned.fp32.safetensors", "fingerprint": tuned_fp}})
    write_lora(path, lora_factors(), metadata={"xlbake_sources": sources})


def resized(path: Path, source: Path, source_hash: str | None = None) -> None:
    """A LoRA as resize writes it: its record names its input file and that file's data hash."""
    record = {"source": source.name, "source_sshs_model_hash": source_hash or safetensors_data_hash(source)}
    write_lora(path, lora_factors(), metadata={"xlbake_resize": json.dumps(record)})


def lora_factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"lora_unet_input_blocks_4_1_proj_in": (torch.randn(8, 2), torch.randn(2, 8))}


def test_outputs_sizes_steps_training_time_and_kept_energy_of_the_difference(tmp_path):
    safetensors_with_step(tmp_path / "tuned.fp32.safetensors", 56, train_seconds=4000.5)
    (tmp_path / "lora-dim32.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / "lora-dim32-rank8.safetensors").write_bytes(b"x" * 500_000)
    (tmp_path / "lora-dim32-1MB.safetensors").write_bytes(b"x" * 900_000)
    write_report(tmp_path / "lora-dim32.report.json", 0.9)
    write_report(tmp_path / "lora-dim32-rank8.report.json", 0.5, source="lora-dim32.safetensors")
    run = collect_outputs(tmp_path)
    assert run.steps == 56 and run.train_seconds == 4000.5
    assert [o.name for o in run.outputs] == [
        "tuned.fp32.safetensors", "lora-dim32.safetensors", "lora-dim32-1MB.safetensors",
        "lora-dim32-rank8.safetensors",
    ]  # fmt: skip
    kept = {o.name: o.kept_energy for o in run.outputs}
    assert kept["lora-dim32.safetensors"] == 0.9 and kept["lora-dim32-1MB.safetensors"] is None
    assert kept["lora-dim32-rank8.safetensors"] == pytest.approx(0.45)  # 50 % of the 90 % the dim-32 file keeps
    assert run.outputs[1].bytes == 2_000_000 and not any(o.stale for o in run.outputs)


def test_loras_of_an_earlier_finetune_are_marked_stale(tmp_path):
    """After the finetune is redone, LoRAs extracted from the old one (and resized from those) are stale."""
    tuned = tmp_path / "tuned.fp32.safetensors"
    save_file({"w": torch.rand(100)}, str(tuned), metadata={"xlbake.global_step": "8"})
    extracted(tmp_path / "lora-dim32.safetensors", tuned)  # from this finetune
    extracted(tmp_path / "lora-dim64.safetensors", "xlbake-fp1:" + "0" * 64)  # from the finetune before
    resized(tmp_path / "lora-dim32-rank8.safetensors", tmp_path / "lora-dim32.safetensors")
    resized(tmp_path / "lora-dim64-rank8.safetensors", tmp_path / "lora-dim64.safetensors")  # of a stale file
    resized(tmp_path / "lora-dim32-rank4.safetensors", tmp_path / "lora-dim32.safetensors", source_hash="0" * 64)
    for name in ("lora-dim32", "lora-dim64", "lora-dim32-rank8", "lora-dim64-rank8", "lora-dim32-rank4"):
        write_report(tmp_path / f"{name}.report.json", 0.9)
    run = collect_outputs(tmp_path)
    assert {o.name.removesuffix(".safetensors") for o in run.outputs if o.stale} == {
        "lora-dim64", "lora-dim64-rank8", "lora-dim32-rank4"
    }  # fmt: skip
    result = ConceptResult("kafka", "ok", None, "", 8, 5.0, str(tmp_path), None, ("kafka",), run.outputs)
    text = render_markdown([result])
    row = next(line for line in text.splitlines() if line.startswith("| kafka |"))
    assert "lora-dim64 (0.00 MB, stale)" in row and "lora-dim32 (0.00 MB)" in row
    assert "dim64" not in row.split("|")[-2] and "dim32 90.0 %" in row  # no kept energy shown for stale files
    assert "- kafka: stale (made from an earlier finetune or input): lora-dim32-rank4, lora-dim64, " in text


def test_diagnose_names_the_failed_stage_and_error_line():
    log = "\n".join(
        [
            "python -m extract --base b ...",
            "100%|####| 3/3\rError: /r/tuned.fp32.safetensors: truncated file; rerun the finetune",
            "make: *** [Makefile:160: /r/lora-dim32.safetensors] Error 1",
        ]
    )
    assert diagnose(log) == ("extract", "/r/tuned.fp32.safetensors: truncated file; rerun the finetune")
    assert diagnose("make: *** [Makefile:170: /r/lora-dim32-rank8.safetensors] Error 1")[0] == "resize"
    assert diagnose("Error: no usable image\nmake: *** [Makefile:150: /r/tuned.fp32.safetensors] Error 1") == (
        "finetune",
        "no usable image",
    )
    parse_error = "Error: --set: train.epochz: unknown key\nMakefile:80: *** /r: the finetune config is invalid.  Stop."
    assert diagnose(parse_error) == ("config", "--set: train.epochz: unknown key")


def test_gpu_slots_and_concept_selection(tmp_path):
    assert parse_gpus("0,1") == ["0", "1"] and parse_gpus("0+1,2+3") == ["0,1", "2,3"] and parse_gpus(None) == []
    with pytest.raises(ConfigError, match="--gpus"):
        parse_gpus("0;1")
    (tmp_path / "b.yaml").write_text("x")
    (tmp_path / "a.yaml").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in select_concepts([], True, tmp_path)] == ["a.yaml", "b.yaml"]
    assert select_concepts(["b"], False, tmp_path) == [(tmp_path / "b.yaml").absolute()]
    with pytest.raises(ConfigError, match="c.yaml: no such concept file"):
        select_concepts(["a", "c"], False, tmp_path)
    with pytest.raises(ConfigError, match="no concepts"):
        select_concepts([], True, tmp_path / "empty")
    with pytest.raises(ConfigError, match="not both"):
        select_concepts(["a"], True, tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.yaml").write_text("x")
    with pytest.raises(ConfigError, match="concepts named a more than once"):
        select_concepts(["a", str(tmp_path / "other" / "a.yaml")], False, tmp_path)


def test_summary_table_and_files(tmp_path):
    ok = ConceptResult(
        "kafka", "ok", None, "", 24, 2.0, str(tmp_path / "kafka"), "0", ("kafka", "kafka woman"),
        (OutputFile("tuned.fp32.safetensors", 12_700_000, None), OutputFile("lora-dim32.safetensors", 2_000_000, 0.97)),
        train_seconds=4500.0,
    )  # fmt: skip
    bad = ConceptResult("broken", "failed", "finetune", "no usable image", None, 3.0, str(tmp_path / "b"), "1", (), ())
    update_summary(ok, tmp_path)
    md, js = update_summary(bad, tmp_path)
    text = md.read_text()
    # the time is the run's training time, not the seconds the (cached) batch run took
    header = "| concept | triggers | status | steps | time | outputs (size) | kept energy |"
    assert header in text
    files = "tuned.fp32 (12.70 MB), lora-dim32 (2.00 MB)"
    assert f"| kafka | kafka, kafka woman | ok | 24 | 1h15m | {files} | dim32 97.0 % |" in text
    assert "| broken | - | failed (finetune) | - | - | - | - |" in text
    assert f"- broken (finetune): no usable image (log: {tmp_path / 'b' / 'batch.log'})" in text
    document = json.loads(js.read_text())
    assert document["concepts"][1]["outputs"][1] == {
        "name": "lora-dim32.safetensors",
        "bytes": 2000000,
        "kept_energy": 0.97,
        "stale": False,
    }
    assert [c["concept"] for c in document["concepts"]] == ["broken", "kafka"]
    assert read_summary(tmp_path) == [bad, ok] and render_markdown([bad, ok]) == text


def test_each_batch_updates_its_concepts_rows_and_keeps_the_others(tmp_path):
    def result(name: str, status: str = "ok", steps: int = 1) -> ConceptResult:
        return ConceptResult(name, status, None, "", steps, 1.0, str(tmp_path / name), None, (), ())

    update_summary(result("a"), tmp_path)
    update_summary(result("b"), tmp_path)  # another `xlbake batch b`
    update_summary(result("a", steps=2), tmp_path)  # a again: its row is replaced
    update_summary(result("b", status="skipped"), tmp_path)  # not run this time: the last real result stays
    update_summary(result("c", status="skipped"), tmp_path)
    assert [(r.concept, r.status, r.steps) for r in read_summary(tmp_path)] == [
        ("a", "ok", 2), ("b", "ok", 1), ("c", "skipped", 1)
    ]  # fmt: skip
    assert [line.split("|")[1].strip() for line in (tmp_path / "summary.md").read_text().splitlines()[2:5]] == [
        "a", "b", "c"
    ]  # fmt: skip


SUMMARY_WRITER = """
import sys
from pathlib import Path
from xlbake.batch.summary import ConceptResult, update_summary
runs, prefix = Path(sys.argv[1]), sys.argv[2]
for i in range(int(sys.argv[3])):
    update_summary(ConceptResult(f"{prefix}{i}", "ok", None, "", i, 1.0, str(runs), None, (), ()), runs)
"""


@pytest.mark.slow
def test_parallel_batches_do_not_lose_each_others_rows(tmp_path):
    """Several batch processes (e.g. one per GPU) updating the summary at once: every row is kept."""
    writers = [
        subprocess.Popen([sys.executable, "-c", SUMMARY_WRITER, str(tmp_path), prefix, "15"]) for prefix in "abcd"
    ]
    assert [w.wait() for w in writers] == [0, 0, 0, 0]
    rows = read_summary(tmp_path)
    assert sorted(r.concept for r in rows) == sorted(f"{p}{i}" for p in "abcd" for i in range(15))
    assert len((tmp_path / "summary.md").read_text().splitlines()) == 2 + 60


def test_after_an_interrupt_the_rest_is_skipped_and_the_summary_written(tmp_path, monkeypatch):
    started = []

    def fake_run_concept(path, settings, *, gpu=None, stop=None):
        started.append(path.stem)
        status = "interrupted" if path.stem == "b" else "ok"
        return ConceptResult(path.stem, status, None, "", 1, 1.0, str(tmp_path / path.stem), gpu, (), ())

    monkeypatch.setattr(batch, "run_concept", fake_run_concept)
    (tmp_path / "Makefile").write_text("")
    for name in "abcd":
        (tmp_path / f"{name}.yaml").write_text("x")
    result = CliRunner().invoke(main, [*"abcd", "-C", str(tmp_path), "--concepts-dir", str(tmp_path)])
    assert result.exit_code == 130 and started == ["a", "b"]
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())["concepts"]
    assert [c["status"] for c in summary] == ["ok", "interrupted", "skipped", "skipped"]
    assert "- d: not started: the batch was interrupted" in (tmp_path / "runs" / "summary.md").read_text()


@needs_make
def test_batch_isolates_failures_and_uses_one_gpu_per_concept(tmp_path, monkeypatch):
    """Through the real Makefile with fake stage commands: a failing and an invalid concept do not stop the rest."""
    venv = make_fake_venv(tmp_path / "venv")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_FAIL", "extract:/broken/")
    monkeypatch.delenv("MAKEFLAGS", raising=False)
    (tmp_path / "preset.yaml").write_text("train: {epochs: 1}\n")
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    for name in ("alpha", "beta", "broken"):
        (tmp_path / name).mkdir()
        (concepts / f"{name}.yaml").write_text(f"datasets: [../{name}]\npreset: ../preset.yaml\ndim: 16\nrank: 4\n")
    (concepts / "typo.yaml").write_text("datasets: [../alpha]\npreset: ../preset.yaml\nrnak: 4\n")
    runs = tmp_path / "runs"
    args = ["--all", "--gpus", "0,1", "-C", str(REPO), "--concepts-dir", str(concepts), "--runs-dir", str(runs)]
    args += [f"--make-arg=VENV={venv}", "--make-arg=-o", f"--make-arg={venv}/.installed"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and (runs / "summary.json").is_file(), result.output
    summary = json.loads((runs / "summary.json").read_text())["concepts"]
    assert [(c["concept"], c["status"], c["stage"]) for c in summary] == [
        ("alpha", "ok", None), ("beta", "ok", None), ("broken", "failed", "extract"), ("typo", "invalid", "config")
    ]  # fmt: skip
    assert "fake extract failure" in summary[2]["message"] and "rnak: unknown key" in summary[3]["message"]
    assert [o["name"] for o in summary[0]["outputs"]] == [
        "tuned.fp32.safetensors", "lora-dim16.safetensors", "lora-dim16-rank4.safetensors"
    ]  # fmt: skip
    assert [o["name"] for o in summary[2]["outputs"]] == ["tuned.fp32.safetensors"]
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    gpus = {Path(r.get("out", r.get("tuned", ""))).parent.name: r["gpu"] for r in records if r["stage"] == "extract"}
    assert sorted(gpus) == ["alpha", "beta", "broken"] and set(gpus.values()) <= {"0", "1"}
    assert "| broken | - | failed (extract) |" in (runs / "summary.md").read_text()
    assert "make -C" in (runs / "beta" / "batch.log").read_text().splitlines()[0].replace("/make -C", "make -C")
    rerun = CliRunner().invoke(main, ["beta", *args[1:]])  # up to date: nothing runs again
    assert rerun.exit_code == 0, rerun.output
    assert len(calls.read_text().splitlines()) == len(records)


@pytest.mark.slow
@needs_make
def test_three_tiny_concepts_with_one_broken_on_cpu(tmp_path, monkeypatch):
    """The real chain: two tiny concepts finish (2 finetune steps each), one with an empty dataset fails; then
    make has nothing left to do for a finished concept."""
    monkeypatch.delenv("MAKEFLAGS", raising=False)
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    (tmp_path / "empty" / "2_nothing here").mkdir(parents=True)
    settings = """\
        preset: tiny-cpu
        overrides: [train.max_steps=2, 'sample.prompts=[]', ema.enabled=false, checkpoint.weights=raw,
                    checkpoint.every_epochs=0, log.tensorboard=false, log.loss_plot=false]
        dim: [8]
        rank: [4]
        """
    for name, dataset in (("one", "builtin:demo"), ("two", "builtin:demo"), ("broken", "../empty")):
        text = f"datasets: [{dataset}]\ntriggers: [xlbk]\n" + textwrap.dedent(settings)
        (concepts / f"{name}.yaml").write_text(text)
    runs = tmp_path / "runs"
    args = ["one", "broken", "two", "-C", str(REPO), "--concepts-dir", str(concepts), "--runs-dir", str(runs)]
    result = CliRunner().invoke(main, [*args, "--make-arg=-o", "--make-arg=.venv/.installed"])
    assert result.exit_code == 1, result.output
    summary = {c["concept"]: c for c in json.loads((runs / "summary.json").read_text())["concepts"]}
    assert summary["broken"]["status"] == "failed" and summary["broken"]["stage"] == "finetune"
    assert "no usable image" in summary["broken"]["message"]
    for name in ("one", "two"):
        assert summary[name]["status"] == "ok" and summary[name]["steps"] == 2
        kept = {o["name"]: o["kept_energy"] for o in summary[name]["outputs"]}
        assert 0 < kept["lora-dim8-rank4.safetensors"] <= kept["lora-dim8.safetensors"] <= 1
    assert "| broken | xlbk | failed (finetune) |" in (runs / "summary.md").read_text()
    make_q = ["make", "-q", "-C", str(REPO), "-o", ".venv/.installed", f"RUNS={runs}", "finetune", "extract", "resize"]
    assert subprocess.run([*make_q, f"CONCEPT={concepts / 'one.yaml'}"], check=False).returncode == 0


HANGING_FINETUNE = """
import os, pathlib, signal, sys, time
run = next((pathlib.Path(a.split("=", 1)[1]) for a in sys.argv if a.startswith("run_dir=")), pathlib.Path())
if run.name == "a" and sys.argv[1:3] == ["-m", "finetune"] and not {"--dry-run", "--resume"} & set(sys.argv):

    def save_and_exit(signum, frame):  # what the finetune does: finish the step, save the state, exit 130
        state = run / "state" / "step-00000003"
        state.mkdir(parents=True)
        (state / "trainer_state.json").write_text('{"global_step": 3, "train_seconds": 3600.0}')
        print(f"Interrupted at step 3; state saved in {state}.", file=sys.stderr)
        sys.exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, save_and_exit)
    (run / "training").touch()
    while True:
        time.sleep(0.01)
"""
WAIT_SECONDS = 300  # upper bound for a process to react on a loaded machine (a liveness bound, not a measurement)


def batch_with_a_hanging_finetune(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """``python -m xlbake.batch.cli a b`` through the real Makefile; a's fresh (not resumed) finetune trains until a
    signal."""
    venv = make_fake_venv(tmp_path / "venv")
    python = venv / "bin" / "python"
    shebang, rest = python.read_text().split("\n", 1)
    python.write_text(f"{shebang}\n{HANGING_FINETUNE}{rest}")
    (tmp_path / "preset.yaml").write_text("train: {epochs: 1}\n")
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    for name in "ab":
        (tmp_path / name).mkdir()
        (concepts / f"{name}.yaml").write_text(f"datasets: [../{name}]\npreset: ../preset.yaml\ndim: 16\nrank: 4\n")
    command = [sys.executable, "-m", "xlbake.batch.cli", "a", "b", "-C", str(REPO), "--concepts-dir", str(concepts)]
    command += ["--runs-dir", str(tmp_path / "runs"), f"--make-arg=VENV={venv}", "--make-arg=-o"]
    command += [f"--make-arg={venv}/.installed"]
    env = {**os.environ, "FAKE_CALLS": str(tmp_path / "calls.jsonl"), "FAKE_FAIL": ""}
    env.pop("MAKEFLAGS", None)
    return command, env


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@needs_make
@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c, SIGINT ignored as in a script's background job", "sigterm"])
def test_one_signal_stops_the_batch_and_the_next_batch_resumes(how, tmp_path):
    """Ctrl-C (the whole foreground process group gets SIGINT) or SIGTERM to the batch alone: the running finetune
    saves its state, no other concept starts, the summary says where it stopped; the same command resumes it."""
    command, env = batch_with_a_hanging_finetune(tmp_path)
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=ignore_sigint if "ignored" in how else None,
    )  # fmt: skip
    try:
        while process.poll() is None and not (runs / "a" / "training").exists():
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[0]
        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        output = process.communicate(timeout=WAIT_SECONDS)[0]
    finally:  # nothing of the batch outlives the test, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 130, output
    assert not (runs / "b").exists(), output  # the next concept did not start
    rows = {r.concept: r for r in read_summary(runs)}
    assert (rows["a"].status, rows["a"].stage, rows["b"].status) == ("interrupted", "finetune", "skipped"), output
    assert rows["a"].message == "interrupted at step 3, resumable: run the same command again"
    assert "| a | - | interrupted (finetune) | - | 1h00m |" in (runs / "summary.md").read_text()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c.get("resume") for c in calls if c["stage"] == "finetune"] == ["auto", None]  # a resumed, b fresh
    assert [r.status for r in read_summary(runs)] == ["ok", "ok"]
