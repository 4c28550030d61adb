"""Optimizer steps of a run, counted here only: by the finetune trainer (its LR schedule and stop), its planner (time
and EMA reach) and ``xlbake dataset plan`` (the guides' images x repeats x epochs / batch arithmetic).

The finetune's sampler cuts each aspect-ratio bucket into batches (a bucket's last batch may be partial), deals the
epoch's batches out to the processes and each process steps the optimizer every ``grad_accum`` batches and at the
end of its epoch: ceil(ceil(batches / processes) / grad_accum) = ceil(batches / (grad_accum x processes)) steps per
epoch. With every image in one bucket this is sd-scripts' count, ceil(ceil(T / (batch x gpus)) / accumulation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Steps:
    """The optimizer steps of a run and the counts they follow from."""

    samples_per_epoch: int
    """Images x repeats, summed over the dataset (the guides' T)."""
    batches_per_epoch: int
    """Batches of one epoch over all processes: each bucket's samples / batch size, rounded up."""
    steps_per_epoch: int
    """Optimizer steps per epoch: batches / (accumulation x processes), rounded up."""
    total_steps: int
    """epochs x steps_per_epoch, or max_steps if that is fewer."""


def count_steps(
    bucket_samples: Iterable[int],
    *,
    batch: int,
    grad_accum: int = 1,
    processes: int = 1,
    epochs: int = 1,
    max_steps: int = 0,
) -> Steps:
    """The steps of a run over buckets of ``bucket_samples`` samples each (images x their repeats; one bucket for a
    dataset whose sizes are not known): ``batch`` per process, ``grad_accum`` batches per step, ``processes``
    processes, ``epochs`` epochs, at most ``max_steps`` steps (0: no limit). ValueError for impossible settings."""
    counts = list(bucket_samples)
    if min(batch, grad_accum, processes, epochs) < 1 or max_steps < 0 or any(count < 0 for count in counts):
        raise ValueError(
            f"need batch, grad_accum, processes and epochs >= 1 and max_steps, samples >= 0; got batch {batch}, "
            f"grad_accum {grad_accum}, processes {processes}, epochs {epochs}, max_steps {max_steps}"
        )
    batches = sum(math.ceil(count / batch) for count in counts)
    per_epoch = steps_per_epoch(batches, grad_accum, processes)
    total = per_epoch * epochs
    return Steps(sum(counts), batches, per_epoch, min(total, max_steps) if max_steps else total)


def steps_per_epoch(batches: int, grad_accum: int, processes: int) -> int:
    """Optimizer steps per epoch from the ``batches`` of one epoch over all processes (``BucketBatchSampler``'s
    ``total_batches``): ceil(batches / (grad_accum x processes))."""
    return math.ceil(batches / (grad_accum * processes))
