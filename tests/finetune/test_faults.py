"""Faults during saves and training: kill -9 mid-save, SIGTERM, disk full, unwritable folders, NaN.

The promise under test: whatever happens, the previous checkpoint/output is intact and loadable, nothing half
written is ever read back, a failed save says so in one line and leaves no temp file, and a stopped or killed run
resumes where its last complete state left off, ending bit-identical to an uninterrupted run.

Kill points run in children forked from ``tests/reliability_helpers.py`` (imports paid once). Disk full is
simulated three ways: ENOSPC from ``os.fsync`` (delayed allocation reports it there), a real kernel EFBIG from
``RLIMIT_FSIZE`` while writing, and EROFS from ``os.replace``. Tests run as root, which ``chmod`` does not stop, so
an unwritable folder is a path under a regular file (NotADirectoryError) or a patched ``os.access``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from reliability_helpers import (
    CHILD_ENV,
    POINTS,
    TEMP_PREFIX,
    WAIT_SECONDS,
    ForkServer,
    file_size_limit,
    kill_9,
    save_version,
    sgm_tensors,
    temp_files,
    tensors_equal,
    visible_lines,
    write_test_lora,
)
from safetensors.torch import load_file
from tiny_run import tiny_run_sections

from xlbake.fileio import save_safetensors_atomic, write_text_atomic

HELPERS = Path(__file__).resolve().parent.parent / "reliability_helpers.py"


# ---------------------------------------------------------------- kill -9 mid-save


@pytest.fixture(scope="module")
def server():
    fork_server = ForkServer()
    yield fork_server
    fork_server.close()


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("writer", ["lora", "sgm"])
def test_kill_9_mid_save_keeps_the_previous_file(server, writer, point, tmp_path):
    from xlbake.fileio import remove_stale_temps
    from xlbake.lora.io import read_lora

    path, old_copy, new_copy = (tmp_path / f"{name}.safetensors" for name in ("out", "v1", "v2"))
    for target, seed in ((path, 1), (old_copy, 1), (new_copy, 2)):
        save_version(writer, target, seed)
    old_bytes = path.read_bytes()
    kill_9(server.pause(writer, point, path, seed=2))
    leftovers = temp_files(tmp_path)
    if point == "after_rename":  # the new file was complete before its name appeared
        assert tensors_equal(path, new_copy) and not leftovers
    else:
        assert path.read_bytes() == old_bytes and tensors_equal(path, old_copy)
        assert leftovers, "no temp file: the kill did not land inside the save"
    if writer == "lora":
        assert read_lora(path).modules  # the real reader takes it, temps beside it or not
    assert sorted(remove_stale_temps(tmp_path)) == leftovers and not temp_files(tmp_path)
    save_version(writer, path, seed=2)  # the rerun completes
    assert tensors_equal(path, new_copy)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_kill_9_mid_state_save_resumes_from_the_last_complete_state(server, point, tmp_path):
    from finetune.state import find_resume, read_state, state_dirs

    root = tmp_path / "state"
    save_version("state", root / "step-00000001", seed=1)
    kill_9(server.pause("state", point, root / "step-00000002", seed=2))
    expected = 2 if point == "after_rename" else 1
    folder = find_resume(root, "auto")
    assert folder is not None and folder.name == f"step-{expected:08d}"
    assert read_state(folder, {}, "")[0].global_step == expected
    assert bool(temp_files(root)) == (point != "after_rename")
    save_version("state", root / "step-00000002", seed=2)  # the resumed run saves its next state
    assert [p.name for p in state_dirs(root)] == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_kill_9_while_resaving_the_same_step_keeps_a_complete_state(server, tmp_path):
    """A state saved twice at one step (a scheduled save, then SIGTERM's), killed between delete and rename."""
    from finetune.state import state_dirs

    root = tmp_path / "state"
    save_version("state", root / "step-00000001", seed=1)
    kill_9(server.pause("state", "before_rename", root / "step-00000001", seed=2))
    assert state_dirs(root), "no complete training state left: the old one was deleted before the new one was in place"


def test_remove_stale_temps_clears_what_killed_writers_leave(tmp_path):
    """Killed writers leave temp files (fileio) and staging folders (training state, diffusers folder, tiny)."""
    import tempfile

    from xlbake.fileio import remove_stale_temps

    (tmp_path / f"{TEMP_PREFIX}abc.safetensors").write_bytes(b"half a file")
    staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=tmp_path))
    (staging / "model.safetensors").write_bytes(b"half a state")
    (tmp_path / "keep.safetensors").write_bytes(b"a finished output")
    assert len(remove_stale_temps(tmp_path)) == 2
    assert not temp_files(tmp_path) and (tmp_path / "keep.safetensors").exists()


# ---------------------------------------------------------------- disk full, unwritable folders


def raising(error: int) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise OSError(error, os.strerror(error))

    return fail


@contextlib.contextmanager
def disk_fault(kind: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``write-efbig``: the kernel refuses writes past 2 KiB; ``fsync-enospc``, ``rename-erofs``: patched calls."""
    if kind == "write-efbig":
        with file_size_limit(2048):
            yield
        return
    with monkeypatch.context() as patch:
        if kind == "fsync-enospc":
            patch.setattr(os, "fsync", raising(errno.ENOSPC))
        else:
            patch.setattr(os, "replace", raising(errno.EROFS))
        yield


WRITERS: dict[str, Callable[[Path, int], object]] = {
    "lora": lambda path, seed: write_test_lora(path, seed=seed, force=True),
    "sgm": lambda path, seed: save_version("sgm", path, seed),
    "tensors": lambda path, seed: save_safetensors_atomic(sgm_tensors(seed), path, force=True),
    "text": lambda path, seed: write_text_atomic(path, "x" * 9000 * seed, force=True),
}


@pytest.mark.parametrize("fault", ["write-efbig", "fsync-enospc", "rename-erofs"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_failed_save_is_one_line_and_keeps_the_earlier_file(writer, fault, tmp_path, monkeypatch):
    from xlbake.errors import OutputError

    path = tmp_path / ("out.txt" if writer == "text" else "out.safetensors")
    WRITERS[writer](path, 1)
    old = path.read_bytes()
    with pytest.raises(OutputError) as caught, disk_fault(fault, monkeypatch):
        WRITERS[writer](path, 2)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and re.search(r"free|another", message), message
    assert path.read_bytes() == old
    assert not temp_files(tmp_path)


@pytest.mark.parametrize("how", ["under-a-file", "access-denied"])
def test_unwritable_output_folder_is_refused_before_writing(how, tmp_path, monkeypatch):
    from xlbake.errors import OutputError

    if how == "under-a-file":
        (tmp_path / "blocker").write_text("a regular file")
        folder = tmp_path / "blocker" / "loras"
    else:
        folder = tmp_path / "loras"
        folder.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    with pytest.raises(OutputError, match=re.escape(str(folder))) as caught:
        write_test_lora(folder / "lora.safetensors")
    assert "\n" not in str(caught.value)
    assert not temp_files(tmp_path) and not (folder / "lora.safetensors").exists()


# ---------------------------------------------------------------- training runs


def training_config(tiny_paths, demo_dataset, run_dir: Path, **sections: dict) -> Path:
    """A four-step tiny finetune saving a checkpoint and state every step; ``sections`` update the config."""
    data = {
        **tiny_run_sections(tiny_paths, demo_dataset, run_dir),
        "train": {"seed": 5, "epochs": 1, "max_steps": 4, "batch_size": 2},
        "optim": {"unet_lr": 1e-3, "te1_lr": 1e-4, "te2_lr": 1e-4},
        "precision": {"mixed": "no"},
        "checkpoint": {"every_steps": 1, "keep_states": 5, "dtype": "fp32"},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def finetune_cli(*args: str) -> tuple[int, str, str]:
    """``python -m finetune ARGS`` in this process: (exit code, stderr, uncaught exception text)."""
    import logging

    from finetune.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(main, list(args))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    crash = "" if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
    return result.exit_code, result.stderr, crash


def assert_same_final_model(run: Path, reference: Path) -> None:
    assert tensors_equal(run / "tuned.fp32.safetensors", reference / "tuned.fp32.safetensors")


def assert_finite_checkpoint(path: Path) -> None:
    from xlbake.sdxl.checkpoint import open_checkpoint

    with open_checkpoint(path) as reader:
        assert all(torch.isfinite(reader.get(key)).all() for key in reader.keys()), path  # noqa: SIM118


def start_finetune(args: list[str], cwd: Path) -> subprocess.Popen:
    """A training subprocess; stderr (logs) goes to a file so that a full pipe never blocks it."""
    with open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen(args, cwd=cwd, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)


def finish(process: subprocess.Popen, cwd: Path) -> str:
    """Wait for the process; its stderr."""
    process.communicate(timeout=WAIT_SECONDS)
    return (cwd / "stderr.txt").read_text()


INTERRUPTIONS = {  # run -> (how the paused run ends, the checkpoint whose save it pauses in)
    "killed": ("kill", "step-00000002.safetensors"),
    "sigterm": ("signal", "step-00000003.safetensors"),
}


@dataclass(frozen=True)
class Runs:
    killed: tuple[subprocess.Popen, Path]  # paused in the step-2 checkpoint save, waiting for kill -9; its RUN
    sigterm: tuple[subprocess.Popen, Path]  # paused in the step-3 checkpoint save, waiting for SIGTERM; its RUN
    reference: Path  # RUN of the uninterrupted run


@pytest.fixture(scope="module")
def runs(tiny_paths, demo_dataset, tmp_path_factory) -> Iterator[Runs]:
    """Two training subprocesses that pause inside a checkpoint save, and the uninterrupted reference run (trained
    in this process while they start)."""
    root = tmp_path_factory.mktemp("runs")
    started = {}
    for name, (until, checkpoint) in INTERRUPTIONS.items():
        (root / name).mkdir()
        run = root / name / "run"
        config = training_config(tiny_paths, demo_dataset, run)
        args = [sys.executable, str(HELPERS), "pause-finetune", until, str(run / "checkpoints" / checkpoint)]
        started[name] = (start_finetune([*args, "--config", str(config)], root / name), run)
    reference = root / "reference" / "run"
    saves_nothing = {"every_steps": 0, "save_state": False}  # saving changes no weight, RNG draw or data order
    try:
        config = training_config(tiny_paths, demo_dataset, reference, checkpoint=saves_nothing)
        code, stderr, crash = finetune_cli("--config", str(config))
        assert code == 0 and not crash, stderr
        yield Runs(started["killed"], started["sigterm"], reference)
    finally:
        for process, run in started.values():
            if process.poll() is None:
                process.kill()
                finish(process, run.parent)


def paused(process: subprocess.Popen, cwd: Path) -> None:
    line = process.stdout.readline()
    assert line.startswith("paused "), finish(process, cwd)[-3000:]


@pytest.mark.slow
def test_sigterm_during_a_save_saves_state_exits_cleanly_and_resume_is_exact(runs):
    from finetune.state import state_dirs

    process, run = runs.sigterm
    paused(process, run.parent)
    process.send_signal(signal.SIGTERM)  # mid-way through the step-3 checkpoint save
    stderr = finish(process, run.parent)
    state = run / "state" / "step-00000003"
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert f"Interrupted at step 3; state saved in {state}." in stderr, stderr[-3000:]
    assert "--resume auto" in visible_lines(stderr)[-1]
    assert state_dirs(run / "state")[-1] == state
    assert_finite_checkpoint(run / "checkpoints" / "step-00000003.safetensors")  # the interrupted save completed
    assert not (run / "tuned.safetensors").exists() and not temp_files(run)
    code, stderr, crash = finetune_cli("--config", str(run / "config.resolved.yaml"), "--resume", "auto")
    assert code == 0 and not crash, stderr[-3000:]
    assert f"resumed from {state}: step 3, epoch 1" in stderr  # continued from the saved state, not from scratch
    assert_same_final_model(run, runs.reference)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_then_resume_is_exact(runs):
    process, run = runs.killed
    paused(process, run.parent)
    process.kill()
    finish(process, run.parent)
    first, second = (run / "checkpoints" / f"step-0000000{i}.safetensors" for i in (1, 2))
    assert_finite_checkpoint(first)  # the previous checkpoint is complete, loadable and finite
    assert not second.exists() and temp_files(run / "checkpoints"), "the kill did not land inside the save"
    code, stderr, crash = finetune_cli("--config", str(run / "config.resolved.yaml"), "--resume", "auto")
    assert code == 0 and not crash, stderr[-3000:]
    assert f"resumed from {run / 'state' / 'step-00000001'}: step 1, epoch 1" in stderr
    assert_same_final_model(run, runs.reference)


def nan_loss_at_step_3(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.trainer import Trainer

    original = Trainer.training_step

    def step(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(Trainer, "training_step", step)


def before_save_at_step_3(monkeypatch: pytest.MonkeyPatch, name: str, fault: Callable) -> None:
    from finetune.trainer import Trainer

    original = getattr(Trainer, name)

    def save(self, *args):
        if self.state.global_step == 3:
            with fault(self):
                return original(self, *args)
        return original(self, *args)

    monkeypatch.setattr(Trainer, name, save)


@contextlib.contextmanager
def nan_weight(trainer) -> Iterator[None]:
    with torch.no_grad():
        next(trainer.model.unet.parameters()).view(-1)[0] = float("nan")
    yield


TRAINING_FAULTS = {  # fault -> (installer, config sections, regexes of the error line)
    "nan-loss": (nan_loss_at_step_3, {}, (r"step 3", r"nan", r"fp16|learning rate|LR")),
    "nan-weights": (
        lambda mp: before_save_at_step_3(mp, "save", nan_weight),
        {},
        (r"not finite", r"nothing saved", r"LR|bf16"),
    ),
    "disk-full-checkpoint": (
        lambda mp: before_save_at_step_3(mp, "save", lambda _: file_size_limit(4096)),
        {},
        (r"step-00000003", r"free|another"),
    ),
    "disk-full-state": (
        lambda mp: before_save_at_step_3(mp, "save_state", lambda _: file_size_limit(4096)),
        {"checkpoint": {"every_steps": 0, "state_every_steps": 1, "keep_states": 5}},
        (r"step-00000003", r"free"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(TRAINING_FAULTS))
def test_training_fault_stops_with_one_line_and_keeps_step_2(fault, tiny_paths, demo_dataset, tmp_path, monkeypatch):
    from finetune.state import find_resume, state_dirs

    install, sections, expected = TRAINING_FAULTS[fault]
    install(monkeypatch)
    run = tmp_path / "run"
    code, stderr, crash = finetune_cli("--config", str(training_config(tiny_paths, demo_dataset, run, **sections)))
    error = visible_lines(stderr)[-1] if stderr.strip() else ""
    assert code == 1 and not crash and "Traceback" not in stderr and error.startswith("Error: "), stderr[-3000:]
    assert all(re.search(p, error, re.I) for p in expected), error
    assert [p.name for p in state_dirs(run / "state")] == ["step-00000001", "step-00000002"]
    assert find_resume(run / "state", "auto") == run / "state" / "step-00000002"
    saved = sorted((run / "checkpoints").glob("*.safetensors")) if (run / "checkpoints").exists() else []
    assert all(p.name < "step-00000003" for p in saved)
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
    assert not list(run.glob("tuned*")) and not temp_files(run)


# ---------------------------------------------------------------- resuming a finished run


def training_config_of(run: Path, moved: Path) -> Path:
    """``run``'s resolved config, with its run_dir set to ``moved`` (a copy of the run)."""
    data = yaml.safe_load((run / "config.resolved.yaml").read_text())
    path = moved.parent / f"{moved.name}.yaml"
    path.write_text(yaml.safe_dump({**data, "run_dir": str(moved)}))
    return path


def run_files(run: Path) -> dict[Path, int]:
    """Every file under ``run`` with its modification time (ns): what a run that writes nothing leaves as it was."""
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_paths, demo_dataset, tmp_path_factory) -> Path:
    """A finished four-step run that saved no checkpoint: its config, outputs and final training state."""
    run = tmp_path_factory.mktemp("finished") / "run"
    config = training_config(tiny_paths, demo_dataset, run, checkpoint={"every_steps": 0})
    code, stderr, crash = finetune_cli("--config", str(config))
    assert code == 0 and not crash, stderr[-3000:]
    return run


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_writes_nothing(finished):
    before = run_files(finished)
    code, stderr, crash = finetune_cli("--config", str(finished / "config.resolved.yaml"), "--resume", "auto")
    assert code == 0 and not crash, stderr[-3000:]
    line = f"{finished}: already finished at step 4 (train.max_steps 4); raise train.max_steps or train.epochs"
    assert line in visible_lines(stderr)[-1], stderr[-3000:]
    assert run_files(finished) == before


@pytest.mark.slow
def test_resuming_a_finished_run_whose_outputs_are_gone_saves_them_again(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for output in run.glob("tuned*.safetensors"):
        output.unlink()
    config = training_config_of(finished, run)
    code, stderr, crash = finetune_cli("--config", str(config), "--resume", "auto")
    assert code == 0 and not crash, stderr[-3000:]
    assert f"resumed from {run / 'state' / 'step-00000004'}: step 4, epoch 1" in stderr
    assert_same_final_model(run, finished)


@pytest.mark.slow
def test_raising_max_steps_continues_the_finished_run(finished, tiny_paths, demo_dataset, tmp_path):
    """Train 2 more steps: resumed from the final state, the model equals a 6-step run's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = training_config(tiny_paths, demo_dataset, run, train={"max_steps": 6}, checkpoint={"every_steps": 0})
    code, stderr, crash = finetune_cli("--config", str(config), "--resume", "auto")
    assert code == 0 and not crash, stderr[-3000:]
    assert f"resumed from {run / 'state' / 'step-00000004'}: step 4, epoch 1" in stderr
    reference = tmp_path / "reference"
    config = training_config(
        tiny_paths, demo_dataset, reference, train={"max_steps": 6}, checkpoint={"every_steps": 0, "save_state": False}
    )
    code, stderr, crash = finetune_cli("--config", str(config))
    assert code == 0 and not crash, stderr[-3000:]
    assert_same_final_model(run, reference)


@pytest.mark.slow
def test_resume_auto_without_a_state_never_restarts_over_outputs(tiny_paths, demo_dataset, tmp_path):
    run = tmp_path / "run"
    config = training_config(tiny_paths, demo_dataset, run, checkpoint={"every_steps": 0, "save_state": False})
    code, stderr, crash = finetune_cli("--config", str(config))
    assert code == 0 and not crash, stderr[-3000:]
    before = run_files(run)
    code, stderr, crash = finetune_cli("--config", str(config), "--resume", "auto")
    error = visible_lines(stderr)[-1]
    assert code == 1 and not crash and error.startswith(f"Error: {run}: no training state to resume"), stderr[-3000:]
    assert "--force" in error
    assert run_files(run) == before


SECOND_SIGNAL_SCRIPT = """
import os, sys, time
from pathlib import Path
import torch
from safetensors import safe_open
from finetune.signals import stop_on_signals
from finetune.state import TrainerState, write_state

root, fifo = Path(sys.argv[1]), sys.argv[2]
write_state(root, TrainerState(global_step=1), lambda d: None, {"w": torch.ones(2)}, keep=5)
with stop_on_signals() as stop:
    print("training", flush=True)
    while not stop:
        time.sleep(0.01)  # the training loop, until the first signal
    stop.arm()  # what the trainer does before its state save
    # A save stuck in native code, as a multi-GB write or fsync is: safetensors (Rust) opening a FIFO no one writes
    # blocks there and retries EINTR itself, so no Python-level signal handler runs until it returns.
    write_state(root, TrainerState(global_step=2), lambda d: safe_open(fifo, "pt"), {}, keep=5)
"""


DUPLICATE_SIGNAL_SCRIPT = """
import sys, time
from pathlib import Path
import torch
from finetune.signals import stop_on_signals
from finetune.state import TrainerState, write_state

with stop_on_signals() as stop:
    print("training", flush=True)
    while not stop:
        time.sleep(0.01)
    time.sleep(0.3)  # the rest of the step: the repeated signal arrives meanwhile
    stop.arm()
    write_state(Path(sys.argv[1]), TrainerState(global_step=2), lambda d: None, {"w": torch.ones(2)}, keep=5)
print("saved", flush=True)
"""


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)])
def test_one_ctrl_c_delivered_twice_under_a_launcher_still_saves(signals, tmp_path):
    """Under accelerate/torchrun a worker gets one Ctrl-C twice (terminal and launcher): the repeat at once is the
    same request, so the state is saved instead of the process being killed."""
    from finetune.state import state_dirs

    process = subprocess.Popen(
        [sys.executable, "-c", DUPLICATE_SIGNAL_SCRIPT, str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert process.stdout.readline() == "training\n"
        for sig in signals:
            process.send_signal(sig)
        out, _ = process.communicate(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and out == "saved\n"
    assert [p.name for p in state_dirs(tmp_path / "state")] == ["step-00000002"]


def wait_for_fifo_open(process: subprocess.Popen) -> None:
    """Wait until ``process`` is blocked opening a FIFO (the kernel's wait channel says so)."""
    wchan = Path(f"/proc/{process.pid}/wchan")
    if not wchan.exists():
        pytest.skip("needs Linux /proc/PID/wchan")
    while process.poll() is None and wchan.read_text() != "wait_for_partner":
        time.sleep(0.01)
    assert process.poll() is None, "the child ended before its save"


@pytest.mark.slow
@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM)])
def test_a_second_signal_during_a_long_state_save_ends_the_run_at_once(signals, tmp_path):
    """First Ctrl-C/SIGTERM: stop and save; a second one while that save is stuck in native code ends the process
    (no waiting for the save to return), and the previous complete state is the one a resume finds."""
    from finetune.state import state_dirs

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    process = subprocess.Popen(
        [sys.executable, "-c", SECOND_SIGNAL_SCRIPT, str(tmp_path / "state"), str(fifo)],
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert process.stdout.readline() == "training\n"
        process.send_signal(signals[0])
        wait_for_fifo_open(process)
        process.send_signal(signals[1])
        process.wait(timeout=WAIT_SECONDS)  # before the fix it stays blocked in the save until killed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signals[1]
    assert [p.name for p in state_dirs(tmp_path / "state")] == ["step-00000001"]
