"""Reading ahead: the next layers' differences are read and formed in a thread while earlier ones are factored.

File reads and torch ops release the GIL, so a thread overlaps them with the SVDs. Memory is bounded: at most
``ahead`` items are made (or being made) beyond those in use. The thread's torch ops run on one thread: the reading
is many small per-piece ops, each of which would fork a team of threads that spin between them while the layers'
workers want the cores (quick benchmark set at 2 threads on a loaded 2-core machine: 11.5-17 CPU s with a team of
2, 5.6-8.6 s with one, 7.2-10.6 s when whole tensors were read; results bit-identical: ATen's reductions here do not
depend on the thread count).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
POLL_SECONDS = 0.1
"""How often the thread, waiting for the consumer to be done with an item, checks whether it has stopped."""
_END = object()


def prefetched(items: Iterator[T], ahead: int) -> Generator[T, None, None]:
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
        torch.set_num_threads(1)  # this thread's own setting: OpenMP keeps one per thread
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

