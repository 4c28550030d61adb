"""The bucket-aware, resumable, multi-process batch sampler of the finetune: each batch from one aspect-ratio bucket,
the order drawn from (seed, epoch), so that a run and a resumed run see the same batches (the step count it makes:
``xlbake.data.steps``).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from torch.utils.data import Sampler

from finetune.data import TrainDataset
from xlbake.errors import InputError, TrainingError


class BucketBatchSampler(Sampler):
    """Batches of one bucket each, shuffled per epoch from (seed, epoch), split between processes, resumable.

    Each epoch: every bucket's indices are shuffled and cut into batches (a last smaller batch is kept unless
    ``drop_last``), then the batches are shuffled. With several processes, rank r takes batches r, r + R, ...;
    the list is padded by repeating its first batches (or cut, with ``drop_last``) so that ranks get equal counts.
    Yields lists of (epoch, index) pairs for ``TrainDataset``. ``total_batches``: batches in one epoch over all
    processes, before padding or cutting.
    """

    def __init__(
        self,
        dataset: TrainDataset,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < num_replicas, got {batch_size}, {rank}, {num_replicas}"
            )
        self.groups = list(dataset.bucket_groups().values())
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        rounding = math.floor if drop_last else math.ceil
        self.total_batches = sum(rounding(len(g) / batch_size) for g in self.groups)
        self.dataset_hash = _fingerprint(dataset)
        if len(self) == 0:
            raise InputError(
                f"the dataset makes {self.total_batches} batches of {batch_size} per epoch, fewer than the "
                f"{num_replicas} processes; add images or lower the batch size"
            )
        self.epoch, self._start, self._yielded = 0, 0, 0

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.total_batches / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a position restored by ``load_state_dict`` is kept for its own epoch."""
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (dataset indices), in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups:
            shuffled = [group[i] for i in rng.permutation(len(group))]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(self)
        batches = (batches * math.ceil(per_rank * self.num_replicas / len(batches)))[: per_rank * self.num_replicas]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self):
        epoch, start = self.epoch, self._start
        self._start, self._yielded = 0, start
        for batch in self.epoch_batches(epoch)[start:]:
            self._yielded += 1
            yield [(epoch, index) for index in batch]

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Epoch and position in it. The position is the number of batches yielded this epoch, exact when the
        DataLoader does not prefetch (num_workers=0); with workers pass ``consumed``, the batches of this epoch
        actually trained on (including any before a resume)."""
        position = self._yielded if consumed is None else consumed
        return {
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "total_batches": self.total_batches,
            "dataset_hash": self.dataset_hash,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved epoch and position; refuse if the seed, batch size, process count or dataset
        changed (the batch order would differ)."""
        for key in ("seed", "batch_size", "num_replicas", "total_batches", "dataset_hash"):
            if state[key] != getattr(self, key):
                raise TrainingError(
                    f"cannot resume the data order: {key} was {state[key]}, now {getattr(self, key)}; restore the "
                    f"dataset and settings of the interrupted run or start a new run"
                )
        self.epoch, self._start, self._yielded = state["epoch"], state["position"], state["position"]


def window_size(position: int, n_batches: int, grad_accum: int) -> int:
    """Batches in the accumulation window of the epoch's batch ``position`` (0-based) out of ``n_batches``:
    ``grad_accum``, or fewer in the epoch's last window (accelerate steps at the end of the dataloader)."""
    start = position - position % grad_accum
    return min(grad_accum, n_batches - start)


def _fingerprint(dataset: TrainDataset) -> str:
    """A short hash of the images, their repeats and buckets: what the batch order depends on."""
    text = "\n".join(f"{s.image}|{s.repeats}|{s.bucket}" for s in dataset.samples)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
