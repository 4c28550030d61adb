"""xlbake batch: every concept's chain through make, failures isolated, GPU slots, the summary table and files."""

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_make import REPO, make_fake_venv

from xlbake.batch import runner as batch
from xlbake.batch.runner import (
    ConceptResult,
    OutputFile,
    collect_outputs,
    diagnose,
    main,
    parse_gpus,
    render_markdown,
    select_concepts,
    write_summary,
)
from xlbake.errors import ConfigError

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def write_report(path: Path, kept: float, source: str | None = None) -> None:
    summary = {"source": source} if source else {"output": "dim32"}
    path.write_text(json.dumps({"summary": summary, "total": {"kept_energy": kept}}))


def safetensors_with_step(path: Path, step: int) -> None:
    header = json.dumps({"__metadata__": {"xlbake.global_step": str(step)}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_outputs_sizes_steps_and_kept_energy_of_the_difference(tmp_path):
    safetensors_with_step(tmp_path / "tuned.fp32.safetensors", 56)
    (tmp_path / "lora-dim32.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / "lora-dim32-rank8.safetensors").write_bytes(b"x" * 500_000)
    (tmp_path / "lora-dim32-1MB.safetensors").write_bytes(b"x" * 900_000)
    write_report(tmp_path / "lora-dim32.report.json", 0.9)
    write_report(tmp_path / "lora-dim32-rank8.report.json", 0.5, source="lora-dim32.safetensors")
    outputs, steps = collect_outputs(tmp_path)
    assert steps == 56
    assert [o.name for o in outputs] == [
        "tuned.fp32.safetensors", "lora-dim32.safetensors", "lora-dim32-1MB.safetensors",
        "lora-dim32-rank8.safetensors",
    ]  # fmt: skip
    kept = {o.name: o.kept_energy for o in outputs}
    assert kept["lora-dim32.safetensors"] == 0.9 and kept["lora-dim32-1MB.safetensors"] is None
    assert kept["lora-dim32-rank8.safetensors"] == pytest.approx(0.45)  # 50 % of the 90 % the dim-32 file keeps
    assert outputs[1].bytes == 2_000_000


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
        "kafka", "ok", None, "", 24, 75.0, str(tmp_path / "kafka"), "0", ("kafka",),
        (OutputFile("tuned.fp32.safetensors", 12_700_000, None), OutputFile("lora-dim32.safetensors", 2_000_000, 0.97)),
    )  # fmt: skip
    bad = ConceptResult("broken", "failed", "finetune", "no usable image", None, 3.0, str(tmp_path / "b"), "1", (), ())
    md, js = write_summary([ok, bad], tmp_path)
    text = md.read_text()
    assert "| kafka | ok | 24 | 1m15s | tuned.fp32 (12.70 MB), lora-dim32 (2.00 MB) | dim32 97.0 % |" in text
    assert "| broken | failed (finetune) | - | 3s | - | - |" in text
    assert f"- broken (finetune): no usable image (log: {tmp_path / 'b' / 'batch.log'})" in text
    document = json.loads(js.read_text())
    assert document["concepts"][0]["outputs"][1] == {
        "name": "lora-dim32.safetensors",
        "bytes": 2000000,
        "kept_energy": 0.97,
    }
    assert document["concepts"][1]["status"] == "failed" and render_markdown([ok, bad]) == text


def test_after_an_interrupt_the_rest_is_skipped_and_the_summary_written(tmp_path, monkeypatch):
    started = []

    def fake_run_concept(path, settings, *, gpu=None):
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
    assert "| broken | failed (extract) |" in (runs / "summary.md").read_text()
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
    assert "| broken | failed (finetune) |" in (runs / "summary.md").read_text()
    make_q = ["make", "-q", "-C", str(REPO), "-o", ".venv/.installed", f"RUNS={runs}", "finetune", "extract", "resize"]
    assert subprocess.run([*make_q, f"CONCEPT={concepts / 'one.yaml'}"], check=False).returncode == 0
