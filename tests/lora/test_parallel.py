"""Layers factored side by side: order, bounded work in flight, errors in place."""

import threading
import time

import pytest

from xlbake.errors import InputError
from xlbake.lora.parallel import in_parallel


def test_in_parallel_keeps_the_order_bounds_the_work_in_flight_and_raises_in_place():
    lock, running, most = threading.Lock(), [0], [0]

    def work(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (x % 3))  # later items may finish first
        with lock:
            running[0] -= 1
        if x == 7:
            raise InputError("bad layer 7")
        return x * x

    taken = []

    def items():
        for x in range(10):
            taken.append(x)
            yield x

    results = in_parallel(items(), work, workers=3, queued=0)
    assert [next(results) for _ in range(7)] == [x * x for x in range(7)]
    with pytest.raises(InputError, match="bad layer 7"):
        next(results)
    assert most[0] == 3 and len(taken) <= 10
    assert list(in_parallel(iter(range(4)), work, workers=1)) == [0, 1, 4, 9]  # one worker: in the calling thread


def test_a_worker_done_early_goes_on_while_the_oldest_item_still_runs():
    started = {x: threading.Event() for x in range(4)}

    def work(x):
        started[x].set()
        if x == 0:  # a big layer: runs until the other worker has taken two more items after it
            assert started[2].wait(timeout=10), "item 2 waited for item 0"
        return x

    assert list(in_parallel(iter(range(4)), work, workers=2, queued=1)) == [0, 1, 2, 3]
