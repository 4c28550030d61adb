"""Memory reused from layer to layer instead of freshly allocated for each: extract's differences as they are read,
and the fast SVD's largest buffers (xlbake.lora.krylov).

A fresh buffer costs a page fault per 4 KiB page on first touch: glibc maps every buffer above its mmap threshold
(at most 32 MB) anew and unmaps it on free, and ``malloc_trim`` hands freed heap pages back. Measured on the quick
benchmark set (40 SDXL-shaped fp16 layers, 175M elements, 1 thread): first touch cost ~2 ns per fp32 element where
a reused buffer's conversion costs 0.1-0.35 ns, and fresh buffers were most of the per-layer reading's 1.25 CPU s;
the SVD's reused buffers cut extract's CPU time by ~8 % on the benchmark's fraction-0.1 set.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KEEP_BYTES = 128 << 20
"""Idle difference buffers kept for reuse, least recently used dropped first; a layer takes the smallest idle one
that holds it. Simulated over SDXL's 988 distinct LoRA tensors in order (one in use while the next is read): 0.44
of their 13 GB of fp32 differences need a fresh buffer (whole buffers of the same size only: 1.2 GB; a bound of
256 MB: 0.32 GB), the pool peaking at 0.30 GB in use and idle together. It bounds the memory this adds."""
SVD_KEEP_BYTES = 64 << 20
"""Idle buffers a factoring thread's pool keeps for its SVDs (xlbake.lora.krylov): the sketch's copy, basis, z rows
and Gram of a layer left idle for the next. Extract at dim 128 on the benchmark's fraction-0.1 set: peak RSS +27 MB
at 1 thread, +49 MB at 2 over one buffer per role; with KEEP_BYTES +76 / +115 MB (no CPU difference seen)."""


class Buffers:
    """A pool of buffers, each handed out again once nothing refers to it any more.

    A buffer is in use as long as any tensor (the one handed out, a view or a row slice of it, in any thread) holds
    its storage, so a difference still being factored on a worker is never overwritten. One thread calls
    :meth:`take` (extract's reading thread; each factoring thread has its own pool for its SVDs).
    """

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._pool: list[tuple[Tensor, int]] = []  # (flat buffer, its use count when idle), oldest first

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized tensor of ``shape``: the start of the smallest idle buffer that holds it, else a new
        one. Off the CPU a new one each time (CUDA's caching allocator already reuses its memory)."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        fitting = [i for i, (b, idle) in enumerate(self._pool) if _fits(b, numel, dtype) and _idle(b, idle)]
        if fitting:
            found = min(fitting, key=lambda i: self._pool[i][0].numel())
            self._pool.append(self._pool.pop(found))  # most recently used last
            buffer = self._pool[-1][0]
        else:
            buffer = torch.empty(numel, dtype=dtype)
            users = _users(buffer)
            if users is None:  # torch cannot tell when it is idle: never reusable, so not kept either
                return buffer.view(shape)
            self._pool.append((buffer, users))
        self._drop_idle(buffer)
        return buffer[:numel].view(shape)

    def _drop_idle(self, taken: Tensor) -> None:
        """Forget the least recently used idle buffers beyond ``keep_bytes`` (freed once the pool lets go)."""
        idle = [b for b, count in self._pool if b is not taken and _idle(b, count)]
        excess = sum(b.nbytes for b in idle) - self.keep_bytes
        dropped = set()
        for buffer in idle:
            if excess <= 0:
                break
            dropped.add(id(buffer))
            excess -= buffer.nbytes
        self._pool = [entry for entry in self._pool if id(entry[0]) not in dropped]


def _fits(buffer: Tensor, numel: int, dtype: torch.dtype) -> bool:
    return buffer.dtype == dtype and buffer.numel() >= numel


def _users(buffer: Tensor) -> int | None:
    """References to the buffer's storage: every tensor on it (views and slices included) holds one. A private
    torch call: tests/extract/test_buffers.py fails if it stops counting views; None where torch lacks it."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(buffer.untyped_storage()._cdata)


def _idle(buffer: Tensor, idle_count: int) -> bool:
    """Whether nothing but the pool holds the buffer (the pool keeps only buffers whose users torch counts)."""
    users = _users(buffer)
    return users is not None and users <= idle_count
