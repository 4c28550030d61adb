"""Reading ahead: the next layers' differences are read and formed in a thread while the current one is factored.

File reads and torch ops release the GIL, so a second thread overlaps them with the SVD in the main thread. The
queue is bounded: at most ``ahead`` finished items wait, plus the one being made and the one being used.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.1
"""How often a producer waiting for room in the queue checks whether the consumer has stopped."""
_END = object()


def prefetched(items: Iterator[T], ahead: int) -> Iterator[T]:
    """``items``, produced by a thread up to ``ahead`` items in advance (0: in the calling thread, no thread).

    An exception raised while producing an item is re-raised here, in its place in the sequence (the same object,
    so an InputError keeps its one-line message). Closing this iterator, or an exception in the consumer such as
    Ctrl-C, stops the thread after the item it is making and waits for it.
    """
    if ahead <= 0:
        yield from items
        return
    box: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put((_END, exc))
            return
        put((_END, None))

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
    finally:
        stop.set()
        thread.join()
