"""`python -m finetune` once or twice in the same launched processes, each process tracing what it did.

    accelerate launch ... tests/distributed_helpers.py TRACE_A ARGS_A... [--then TRACE_B ARGS_B...]

Each run is the finetune CLI exactly as `-m finetune` calls it; the second starts from fresh accelerate state (the
first run's cleanup resets it; only the process group is kept) and reads everything it resumes from the files.
Starting the processes once instead of twice halves the cost of the multi-process resume tests.

The trace of a run is written from outside the trainer, by wrapping its public methods (``RankTrace``):
``TRACE/rank{N}.txt`` the images of every batch process N trained on, ``TRACE/rank{N}.safetensors`` its whole
trained weights at the end, and ``TRACE_A/rank{N}.writes.txt`` every path the process wrote (``audit_writes``).

With XLBAKE_TEST_NAN=RANK:STEP:BATCH, process RANK's loss is NaN on batch BATCH (0-based) of the accumulation
window of optimizer step STEP (1-based).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from xlbake.batch.run_folder import FINAL_TAG

SEPARATOR = "--then"
NAN_ENV = "XLBAKE_TEST_NAN"
WRITE_EVENTS = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")
"""Audit events (besides opening for writing) that change the file system; the path is the last str argument."""


class RankTrace:
    """What one process trained on and ended with: ``<folder>/rank{N}.txt``, one line per image of every batch,
    ``epoch step path``; ``<folder>/rank{N}.safetensors``, the process's whole trained weights at the end
    (gathered under ZeRO-3). The folder is outside RUN/."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = Path(folder), rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batches = self.folder / f"rank{rank}.txt"

    def batch(self, epoch: int, step: int, paths: Sequence[str]) -> None:
        """Record the images of one batch (``step``: optimizer steps done before it)."""
        with open(self.batches, "a", encoding="utf-8") as handle:
            handle.writelines(f"{epoch} {step} {path}\n" for path in paths)

    def weights(self, state_dicts: Mapping[str, Mapping[str, Tensor]]) -> Path:
        """Write this process's final weights (part -> state dict) as ``{part}.{key}`` tensors."""
        from xlbake.fileio import save_safetensors_atomic

        tensors = {f"{part}.{key}": t for part, sd in state_dicts.items() for key, t in sd.items()}
        return save_safetensors_atomic(tensors, self.folder / f"rank{self.rank}.safetensors", force=True)


def trace_trainer(folder: Callable[[], Path]) -> None:
    """Make every Trainer of this process record its batches and final weights in the current ``folder()``:
    a batch as ``training_step`` gets it, the weights after the final save (a collective under ZeRO-3, which every
    process makes there)."""
    from finetune.distributed import trained_state_dicts
    from finetune.trainer import Trainer

    training_step, save = Trainer.training_step, Trainer.save

    def traced_step(self: Trainer, batch: dict) -> torch.Tensor:
        trace = RankTrace(folder(), self.accelerator.process_index)
        trace.batch(self.state.epoch, self.state.global_step, batch["path"])
        return training_step(self, batch)

    def traced_save(self: Trainer, tag: str) -> list[Path]:
        written = save(self, tag)
        if tag == FINAL_TAG:
            weights = trained_state_dicts(self.model, self.parts, self.fixed, keep=True)
            RankTrace(folder(), self.accelerator.process_index).weights(weights)
        return written

    Trainer.training_step = traced_step  # type: ignore[method-assign]
    Trainer.save = traced_save  # type: ignore[method-assign]


def audit_writes(folder: Path, rank: int) -> Path:
    """Record every path this process opens for writing, creates, renames to or removes, one ``event path`` line
    each, in ``<folder>/rank{N}.writes.txt`` (a Python audit hook, which cannot be removed: call it once per
    process; writes made by C code to files it opened itself are not seen, ours all start in Python)."""
    path = Path(folder) / f"rank{rank}.writes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (open for the life of the process)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple) -> None:
        if event == "open":  # (path, mode or None for os.open, flags)
            mode, flags = args[1], args[2]
            changes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & writing)
            paths = args[:1]
        else:
            changes = event in WRITE_EVENTS
            paths = args
        paths = [a for a in paths if isinstance(a, (str, bytes, os.PathLike))]
        if changes and paths:
            log.write(f"{event} {os.fsdecode(paths[-1])}\n")

    sys.addaudithook(hook)
    return path


def inject_nan(spec: str) -> None:
    """Make one process's loss NaN on one batch of one optimizer step (``spec``: ``RANK:STEP:BATCH``)."""
    from finetune.trainer import Trainer

    rank, step, index = (int(v) for v in spec.split(":"))
    original = Trainer.training_step

    def training_step(self: Trainer, batch: dict) -> torch.Tensor:
        loss = original(self, batch)
        in_window = self.state.batches_in_epoch % self.cfg.train.grad_accum == index
        hit = self.accelerator.process_index == rank and self.state.global_step + 1 == step and in_window
        return loss * float("nan") if hit else loss

    Trainer.training_step = training_step  # type: ignore[method-assign]


def run(args: list[str]) -> None:
    """One finetune CLI run (errors propagate: the process exits non-zero and the launcher stops the others)."""
    from finetune.cli import main

    main.main(args, prog_name="python -m finetune", standalone_mode=False)


if __name__ == "__main__":
    # accelerate then keeps the process group at the end of the first run (as after a fork launch), for the second
    os.environ["FORK_LAUNCHED"] = "1"
    argv = sys.argv[1:]
    cut = argv.index(SEPARATOR) if SEPARATOR in argv else len(argv)
    runs = [(Path(argv[0]), argv[1:cut])] + ([(Path(argv[cut + 1]), argv[cut + 2 :])] if cut < len(argv) else [])
    audit_writes(runs[0][0], int(os.environ.get("RANK", "0")))  # the launcher's rank of this process
    current: list[Path] = []
    trace_trainer(lambda: current[-1])
    if os.environ.get(NAN_ENV):
        inject_nan(os.environ[NAN_ENV])
    for trace, args in runs:
        current.append(trace)
        run(args)
