"""Overlap: the next layers' differences are read and formed in a thread while earlier ones are factored, and
several layers are factored at once on a CPU with several cores.

File reads and torch ops release the GIL, so threads overlap them with the SVDs. Memory is bounded: at most ``ahead``
items are made (or being made) beyond those in use, and at most ``workers`` are factored at once.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
POLL_SECONDS = 0.1
"""How often the thread, waiting for the consumer to be done with an item, checks whether it has stopped."""
_END = object()


def prefetched(items: Iterator[T], ahead: int) -> Iterator[T]:
    """``items``, produced by a thread at most ``ahead`` items beyond the one in use (0: in the calling thread).

    The thread makes an item only when fewer than ``ahead`` are made beyond the one the consumer holds, so at most
    ``ahead + 1`` exist at once. An exception raised while producing an item is re-raised here, in its place in
    the sequence (the same object, so an InputError keeps its one-line message). Closing this iterator, or an
    exception in the consumer such as Ctrl-C, stops the thread after the item it is making and waits for it.
    """
    if ahead <= 0:
        yield from items
        return
    box: queue.SimpleQueue[tuple[object, BaseException | None]] = queue.SimpleQueue()
    room = threading.Semaphore(ahead + 1)  # released by the consumer when it is done with an item
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                while not room.acquire(timeout=POLL_SECONDS):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, _END)
                box.put((item, None))
                if item is _END:
                    return
                del item  # the consumer's now: no reference kept here while waiting for room
        except BaseException as exc:  # handed to the consumer, which raises it
            box.put((_END, exc))

    thread = threading.Thread(target=produce, name="xlbake-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item  # type: ignore[misc]
            del item  # done with it: it no longer counts, the thread may make one more
            room.release()
    finally:
        stop.set()
        thread.join()


def in_parallel(items: Iterator[T], work: Callable[[T], R], workers: int, threads_each: int = 1) -> Iterator[R]:
    """``work(item)`` for each item, in order, on up to ``workers`` threads at once, each with ``threads_each`` torch
    threads (``workers`` <= 1: in the calling thread, as ``map``).

    Layers of a few MB factor far better side by side on one thread each than one at a time on all cores, whose
    small GEMMs, QRs and eigen-solves barely split. At most ``workers`` items are in flight: the next is taken only
    when the oldest is done. An exception from ``work`` is raised in its place; closing the iterator cancels what has
    not started and waits for what has. The caller's torch thread count is restored at the end.
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
                    if len(pending) >= workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        torch.set_num_threads(threads)  # the workers' setting may be process-wide (MKL, OpenMP)
