"""LoRA layers factored side by side: each on a worker thread with its own few torch threads.

A layer's SVD is small GEMMs, QRs and eigen-solves that barely split over threads (resize's r x r eigh costs 10x its
CPU time at 2 threads), while torch ops release the GIL: whole layers on one-thread workers use the cores instead.
Used by extract's and resize's per-layer loops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def in_parallel(
    items: Iterable[T], work: Callable[[T], R], workers: int, threads_each: int = 1, queued: int = 1
) -> Iterator[R]:
    """``work(item)`` for each item, in order, on up to ``workers`` threads at once, each with ``threads_each`` torch
    threads (``workers`` <= 1: in the calling thread, as ``map``).

    At most ``workers + queued`` items are in flight: the next is taken (an item the caller makes lazily is made)
    only when the oldest is done, so inputs go as they are factored. The ``queued`` ones let a worker that is done
    go on while the oldest item, a big layer, still runs on another (with none, SDXL's mix of 1280x1280 and
    10240x1280 layers left a core idle behind each big one). An exception from ``work`` is raised in its place;
    closing the iterator cancels what has not started and waits for what has. The caller's torch thread count is
    restored at the end.
    """
    if workers <= 1:
        yield from map(work, items)
        return
    threads = torch.get_num_threads()
    pending: deque[Future[R]] = deque()
    try:
        pool = ThreadPoolExecutor(workers, "xlbake-factor", initializer=torch.set_num_threads, initargs=(threads_each,))
        with pool:
            try:
                for item in items:
                    pending.append(pool.submit(work, item))
                    del item  # the worker's now
                    if len(pending) >= workers + max(0, queued):
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        torch.set_num_threads(threads)  # the workers' setting may be process-wide (MKL, OpenMP)
