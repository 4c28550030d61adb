"""xlbake batch --slurm: the job scripts, and a real one-node SLURM running the tiny chain (jobs requeued at their
time limit resume exactly; a broken concept fails alone; --status writes the same summary as a local batch)."""

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fake_make import REPO
from safetensors.torch import load_file

from xlbake.batch.cli import main
from xlbake.batch.concepts import load_concept
from xlbake.batch.runner import BatchSettings, make_command
from xlbake.batch.slurm import JOB_NAME, SlurmSettings, job_script
from xlbake.batch.summary import ConceptResult, read_summary, render_markdown

WAIT_SECONDS = 900  # liveness bound for a job on a loaded 2-core machine (not a measurement)
TINY = """\
    preset: tiny-cpu
    overrides: [train.max_steps=6, 'sample.prompts=[]', ema.enabled=false, checkpoint.weights=raw,
                checkpoint.every_epochs=0, checkpoint.state_every_steps=1, log.tensorboard=false,
                log.loss_plot=false]
    dim: [8]
    rank: [4]
    """


def write_concepts(folder: Path, datasets: dict[str, str]) -> Path:
    concepts = folder / "concepts"
    concepts.mkdir()
    for name, dataset in datasets.items():
        text = f"datasets: [{dataset}]\ntriggers: [xlbk]\n" + textwrap.dedent(TINY)
        (concepts / f"{name}.yaml").write_text(text)
    return concepts


def test_job_script_asks_for_the_options_traps_the_signals_and_runs_the_shared_make_chain(tmp_path):
    concepts = write_concepts(tmp_path, {"one": "builtin:demo"})
    concept = load_concept(concepts / "one.yaml")
    batch = BatchSettings(REPO, tmp_path / "runs", ("DIM=64",))
    slurm = SlurmSettings("a100", 2, "12:00:00", "lab", signal_seconds=300, extra=("--mem=64G",))
    script = job_script(concept, batch, slurm, make="/usr/bin/make")
    sbatch = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "--requeue", "--job-name=xlbake-one", f"--output={tmp_path}/runs/one/batch.log", "--open-mode=append",
        "--signal=B:USR1@300", "--partition=a100", "--gres=gpu:2", "--time=12:00:00", "--account=lab", "--mem=64G",
    ]  # fmt: skip
    command = make_command("/usr/bin/make", concept, batch, tmp_path / "runs" / "one")
    assert " ".join(command) + " &" in script  # the local pool's command: no quoting needed for these words
    assert "trap on_usr1 USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_usr1_saves_through_make_then_requeues(tmp_path):
    """The script's traps without SLURM: USR1 sends TERM to make's chain, then ``scontrol requeue`` runs (a fake)."""
    concepts = write_concepts(tmp_path, {"one": "builtin:demo"})
    batch = BatchSettings(REPO, tmp_path / "runs")
    script = job_script(load_concept(concepts / "one.yaml"), batch, SlurmSettings(), make=str(tmp_path / "make"))
    (tmp_path / "make").write_text("#!/bin/bash\ntrap 'echo saved > saved; exit 130' TERM\ntouch started\n"
                                   "while :; do sleep 0.05; done\n")  # fmt: skip
    (tmp_path / "scontrol").write_text('#!/bin/bash\necho "$@" > requeued\n')
    for tool in ("make", "scontrol"):
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    job = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(10)  # SIGUSR1, as --signal=B:USR1@N sends it before the time limit
    assert job.wait(timeout=60) == 0
    assert (tmp_path / "saved").read_text() == "saved\n"
    assert (tmp_path / "requeued").read_text() == "requeue 42\n"
    assert not (tmp_path / "runs" / "one" / "slurm.exit").exists()  # not ended: the requeued job finishes it


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / JOB_NAME).read_text())["job_id"]


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_SECONDS} s"
        time.sleep(0.5)


INTERRUPTIONS = {
    # SIGTERM to every process of the job, as preemption does. The USR1 path before a time limit (the script saves
    # and requeues itself) runs for real with XLBAKE_SLURM_USR1=1 (~5 min more: SLURM delays a requeued job ~2 min);
    # test_usr1_saves_through_make_then_requeues checks that path's script without SLURM in every run.
    "scontrol requeue": ["scontrol", "requeue"],
}
if os.environ.get("XLBAKE_SLURM_USR1") == "1":
    INTERRUPTIONS["usr1"] = ["scancel", "--signal=USR1", "--batch"]  # what --signal=B:USR1@N does


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(INTERRUPTIONS))
def test_slurm_batch_requeued_job_resumes_exactly_and_a_broken_concept_fails_alone(how, slurm, tmp_path, monkeypatch):
    """Three jobs on the real tiny chain: 'one' is interrupted mid-finetune (USR1 as before its time limit, or
    requeued by SLURM), saves, comes back and resumes to the same weights as 'two', which ran through; 'broken'
    (an empty dataset) fails alone."""
    monkeypatch.delenv("MAKEFLAGS", raising=False)
    (tmp_path / "empty" / "2_nothing here").mkdir(parents=True)
    concepts = write_concepts(tmp_path, {"one": "builtin:demo", "two": "builtin:demo", "broken": "../empty"})
    runs = tmp_path / "runs"
    args = ["-C", str(REPO), "--concepts-dir", str(concepts), "--runs-dir", str(runs)]
    make_args = ["--make-arg=-o", "--make-arg=.venv/.installed"]
    submitted = CliRunner().invoke(main, ["one", "two", "broken", "--slurm", *args, *make_args])
    assert submitted.exit_code == 0, submitted.output
    assert {r.concept: r.status for r in read_summary(runs)} == {"one": "queued", "two": "queued", "broken": "queued"}
    one = job_id(runs / "one")
    wait_until(lambda: (runs / "one" / "state" / "step-00000002" / "trainer_state.json").exists(), "one's step 2")
    subprocess.run([*INTERRUPTIONS[how], one], check=True)
    for name in ("one", "two", "broken"):
        wait_until(lambda n=name: (runs / n / "slurm.exit").exists() and not squeue_state(job_id(runs / n)), name)
    status = CliRunner().invoke(main, ["--slurm", "--status", *args])
    assert status.exit_code == 1, status.output  # broken failed
    rows = {r.concept: r for r in read_summary(runs)}
    assert (rows["broken"].status, rows["broken"].stage) == ("failed", "finetune")
    assert "no usable image" in rows["broken"].message
    assert f"(log: {runs / 'broken' / 'batch.log'})" in (runs / "summary.md").read_text()
    for name in ("one", "two"):
        assert (rows[name].status, rows[name].steps) == ("ok", 6), rows[name]
        assert {o.name for o in rows[name].outputs} >= {"lora-dim8.safetensors", "lora-dim8-rank4.safetensors"}
    log = (runs / "one" / "batch.log").read_text()
    assert how != "usr1" or f"requeueing job {one}" in log
    resumed = [int(step) for step in re.findall(r"resumed from \S+: step (\d+)", log)]
    assert resumed and resumed[0] >= 2, log[-3000:]  # from its saved state, not from zero
    tuned = [load_file(runs / n / "tuned.fp32.safetensors") for n in ("one", "two")]
    assert tuned[0].keys() == tuned[1].keys()
    assert all(torch.equal(tuned[0][k], tuned[1][k]) for k in tuned[0])


def test_queued_and_running_jobs_are_not_listed_as_failures():
    rows = [ConceptResult(name, status, None, f"SLURM job {i}", None, 0.0, f"runs/{name}", None, (), ())
            for i, (name, status) in enumerate((("a", "queued"), ("b", "running")))]  # fmt: skip
    text = render_markdown(rows)
    assert "| a | - | queued |" in text and "| b | - | running |" in text
    assert "Failures" not in text
