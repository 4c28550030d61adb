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

    results = in_parallel(items(), work, workers=3)
    assert [next(results) for _ in range(7)] == [x * x for x in range(7)]
    with pytest.raises(InputError, match="bad layer 7"):
        next(results)
    assert most[0] == 3 and len(taken) <= 10
    assert list(in_parallel(iter(range(4)), work, workers=1)) == [0, 1, 4, 9]  # one worker: in the calling thread
