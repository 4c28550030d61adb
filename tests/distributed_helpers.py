"""`python -m finetune` twice in the same launched processes: a run, then another that resumes its state.

    accelerate launch ... tests/distributed_helpers.py TRACE_A ARGS_A... [--then TRACE_B ARGS_B...]

Each run is the finetune CLI exactly as `-m finetune` calls it, with XLBAKE_TRACE_DIR set to its trace folder; the
second starts from fresh accelerate state (the first run's cleanup resets it; only the process group is kept) and
reads everything it resumes from the files. Starting the processes once instead of twice halves the cost of the
multi-process resume tests.

With XLBAKE_TEST_NAN=RANK:STEP:BATCH, process RANK's loss is NaN on batch BATCH (0-based) of the accumulation
window of optimizer step STEP (1-based).
"""

from __future__ import annotations

import os
import sys

import torch

from finetune.cli import main
from finetune.distributed import TRACE_ENV

SEPARATOR = "--then"
NAN_ENV = "XLBAKE_TEST_NAN"


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


def run(trace: str, args: list[str]) -> None:
    """One finetune CLI run (errors propagate: the process exits non-zero and the launcher stops the others)."""
    os.environ[TRACE_ENV] = trace
    main.main(args, prog_name="python -m finetune", standalone_mode=False)


if __name__ == "__main__":
    # accelerate then keeps the process group at the end of the first run (as after a fork launch), for the second
    os.environ["FORK_LAUNCHED"] = "1"
    if os.environ.get(NAN_ENV):
        inject_nan(os.environ[NAN_ENV])
    argv = sys.argv[1:]
    cut = argv.index(SEPARATOR) if SEPARATOR in argv else len(argv)
    first, second = argv[:cut], argv[cut + 1 :]
    run(first[0], first[1:])
    if second:
        run(second[0], second[1:])
