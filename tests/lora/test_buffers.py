"""xlbake.lora.buffers: a pooled buffer is reused once idle, never while any tensor still uses it."""

import threading
import weakref

import torch

from xlbake.lora.buffers import Buffers
from xlbake.lora.lowrank import to_matrix

CPU = torch.device("cpu")


def test_an_idle_buffer_is_handed_out_again_and_one_in_use_is_not():
    buffers = Buffers()
    first = buffers.take((4, 6), torch.float32, CPU)
    pointer = first.data_ptr()
    del first
    again = buffers.take((6, 4), torch.float32, CPU)  # as many elements, another shape: the same memory
    assert again.shape == (6, 4) and again.data_ptr() == pointer
    del again
    views = (lambda t: t[1:3], lambda t: to_matrix(t.view(6, 2, 1, 2)), lambda t: t.view(-1)[5:])
    for view_of in views:  # a view or slice alone keeps the buffer in use
        view = view_of(buffers.take((6, 4), torch.float32, CPU))
        assert view.untyped_storage().data_ptr() == pointer
        assert buffers.take((6, 4), torch.float32, CPU).data_ptr() != pointer
        del view
    assert buffers.take((6, 4), torch.float32, CPU).data_ptr() == pointer
    assert buffers.take((6, 4), torch.float64, CPU).data_ptr() != pointer  # another dtype: its own buffer
    buffers = Buffers()
    small, large = (buffers.take((n,), torch.float32, CPU).data_ptr() for n in (24, 100))
    assert buffers.take((5, 4), torch.float32, CPU).data_ptr() == small  # fewer: the smallest idle one that fits
    assert buffers.take((50,), torch.float32, CPU).data_ptr() == large


def test_where_torch_cannot_count_a_storage_users_no_buffer_is_reused_or_kept(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    buffers = Buffers()
    first = buffers.take((4, 6), torch.float32, CPU)
    held = first[1:3]  # still in use: it must not come back
    assert buffers.take((4, 6), torch.float32, CPU).untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    gone = weakref.ref(buffers.take((1024,), torch.float32, CPU)._base)
    assert gone() is None and not buffers._pool  # never reusable, so never kept: the pool holds nothing


def test_off_the_cpu_each_take_is_a_new_tensor_there():
    buffers = Buffers()
    taken = buffers.take((3, 4), torch.float32, torch.device("meta"))  # a stand-in for CUDA: no pooling there
    assert taken.device.type == "meta" and taken.shape == (3, 4) and not buffers._pool


def test_a_buffer_held_by_another_thread_is_not_reused_until_it_lets_go():
    buffers = Buffers()
    handed = buffers.take((8, 8), torch.float32, CPU)
    pointer, holding, release = handed.data_ptr(), threading.Event(), threading.Event()

    def worker(diff):
        holding.set()
        release.wait()

    thread = threading.Thread(target=worker, args=(handed,))
    thread.start()
    del handed
    holding.wait()
    assert buffers.take((8, 8), torch.float32, CPU).data_ptr() != pointer
    release.set()
    thread.join()
    del thread  # its target's frame held the tensor
    taken = [buffers.take((8, 8), torch.float32, CPU) for _ in range(2)]
    assert pointer in {t.data_ptr() for t in taken}


def test_idle_buffers_beyond_the_bound_are_let_go_least_recently_used_first():
    kib = 1024 // 4  # fp32 elements per KiB
    buffers = Buffers(keep_bytes=32 << 10)

    def take(kibs):
        view = buffers.take((kibs * kib,), torch.float32, CPU)
        return weakref.ref(view._base)  # the pooled buffer: alive as long as the pool keeps it

    a, b = take(16), take(32)
    assert a() is not None and b() is not None  # 16 KiB idle besides the one taken: kept
    assert take(16)() is a()  # reused, now the most recently used
    c = take(48)  # 16 + 32 KiB idle besides it: the least recently used (b) goes
    assert b() is None and a() is not None and c() is not None
    take(64)  # 16 + 48 KiB idle besides it: both go
    assert a() is None and c() is None
