"""extract: the next layers are read by a thread while one is factored; same results, same errors, clean stops."""

import threading
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

import extract.layers
from extract.config import ExtractConfig
from extract.pipeline import run_extract
from extract.prefetch import prefetched
from xlbake.errors import InputError
from xlbake.lora.io import SAVE_DTYPES
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import CheckpointReader, open_checkpoint, save_sgm_checkpoint

THREAD = "xlbake-prefetch"


def _prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name == THREAD]


@pytest.fixture(scope="module")
def changed(tiny_paths, tmp_path_factory):
    """Tuned = base + small dense noise in every LoRA layer (3x3 convs too), stored in fp16 as most finetunes are."""
    gen = torch.Generator().manual_seed(5)
    with open_checkpoint(tiny_paths.single_file) as reader:
        weights = {key: reader.get(key).clone() for key in reader}
        targets = kohya_targets(reader.shapes(), conv=True)
    folder = tmp_path_factory.mktemp("changed")
    base = save_sgm_checkpoint(weights, folder / "base.safetensors", dtype=torch.float16)
    for key in {target.key for target in targets}:
        weights[key] = weights[key] + 1e-3 * weights[key].std() * torch.randn(weights[key].shape, generator=gen)
    tuned = save_sgm_checkpoint(weights, folder / "tuned.safetensors", dtype=torch.float16)
    return base, tuned, targets


def _extract(base, tuned, out, **options):
    cfg = ExtractConfig(base=base, tuned=tuned, out=out, dim=(4, 2), conv_dim=(2, 2), **options)
    return run_extract(cfg, echo=lambda _: None)


@pytest.mark.parametrize("svd", ["fast", "exact"])
def test_loras_are_bit_identical_with_and_without_prefetch(changed, tmp_path, monkeypatch, svd):
    base, tuned, _ = changed
    written = {}
    for ahead in (0, 2):
        monkeypatch.setattr(extract.layers, "PREFETCH_LAYERS", ahead)
        paths = _extract(base, tuned, tmp_path / f"ahead{ahead}" / "lora.safetensors", svd=svd).outputs
        written[ahead] = [load_file(path) for path in paths]
    for plain, ahead in zip(written[0], written[2], strict=True):
        assert plain.keys() == ahead.keys()
        assert all(torch.equal(plain[key], ahead[key]) for key in plain)


def test_the_difference_is_read_in_the_prefetch_thread_and_factors_are_held_at_the_save_dtype(
    changed, tmp_path, monkeypatch
):
    base, tuned, _ = changed
    readers, held = set(), []
    real_pieces, real_factor = CheckpointReader.pieces, extract.layers.factor_layer

    def pieces(self, key, scratch):
        readers.add(threading.current_thread().name)
        return real_pieces(self, key, scratch)

    def factor_layer(*args):
        held.append(real_factor(*args))
        return held[-1]

    monkeypatch.setattr(CheckpointReader, "pieces", pieces)
    monkeypatch.setattr(extract.layers, "factor_layer", factor_layer)
    _extract(base, tuned, tmp_path / "lora.safetensors", save_precision="bf16")
    assert THREAD in readers
    assert {layer.up.dtype for layer in held} == {layer.down.dtype for layer in held} == {SAVE_DTYPES["bf16"]}
    assert not _prefetch_threads()


def test_a_read_error_in_the_prefetch_thread_is_the_same_one_line_input_error(changed, tmp_path, monkeypatch):
    base, tuned, targets = changed
    broken, raised_in = targets[len(targets) // 2].key, []
    real_pieces = CheckpointReader.pieces
    message = f"{tuned}: file ended while reading {broken}; the file is truncated, re-download it"

    def pieces(self, key, scratch):
        if key == broken and self.path == tuned:
            raised_in.append(threading.current_thread().name)
            raise InputError(message)
        return real_pieces(self, key, scratch)

    monkeypatch.setattr(CheckpointReader, "pieces", pieces)
    with pytest.raises(InputError) as error:
        _extract(base, tuned, tmp_path / "lora.safetensors")
    assert str(error.value) == message and raised_in == [THREAD]
    assert not _prefetch_threads() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("error", [TypeError("a bug"), InputError("bad layer")])
def test_an_error_while_factoring_stops_the_reading_thread_before_it_propagates(changed, tmp_path, monkeypatch, error):
    # the traceback keeps extract's frames alive: a reading thread left to them was still in a torch op when the
    # interpreter exited after an uncaught error, which aborted the process ("terminate called", exit 134)
    base, tuned, _ = changed
    real, calls = extract.layers.factor_layer, []

    def factor_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(extract.layers, "factor_layer", factor_layer)
    with pytest.raises(type(error)) as raised:
        _extract(base, tuned, tmp_path / "lora.safetensors")
    assert raised.value is error and not _prefetch_threads()


def test_prefetched_keeps_the_order_and_raises_an_error_in_its_place():
    def items():
        yield from range(5)
        raise InputError("bad file")

    seen = []
    with pytest.raises(InputError, match="^bad file$"):
        for item in prefetched(items(), ahead=2):
            seen.append(item)
    assert seen == list(range(5)) and not _prefetch_threads()


def test_an_interrupted_consumer_stops_the_prefetch_thread():
    """Ctrl-C in the main thread (or any exception there) while the thread waits for room in the queue."""
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    with pytest.raises(KeyboardInterrupt):
        for item in prefetched(items(), ahead=1):
            if item == 3:
                raise KeyboardInterrupt
    assert not _prefetch_threads() and len(produced) <= 3 + 3  # the one used, one queued, one being made


@pytest.mark.parametrize("ahead", [1, 2])
def test_at_most_ahead_items_exist_beyond_the_one_in_use(ahead):
    """What bounds memory: the thread makes an item only when the consumer is done with an earlier one."""
    alive, most = weakref.WeakSet(), []

    class Layer:  # stands for one layer's difference
        pass

    def items():
        for _ in range(20):
            layer = Layer()
            alive.add(layer)
            most.append(len(alive))
            yield layer
            del layer

    stream = prefetched(items(), ahead)
    while (layer := next(stream, None)) is not None:
        time.sleep(0.005)  # factoring it: the thread runs ahead meanwhile
        del layer
    assert max(most) <= ahead + 1 and len(most) == 20


@pytest.mark.parametrize("svd", ["fast", "exact"])
def test_loras_are_bit_identical_when_layers_are_factored_side_by_side(changed, tmp_path, monkeypatch, svd):
    """Two workers of one torch thread each give the very bits of one worker at one thread."""
    base, tuned, _ = changed
    threads, written, factored_on = torch.get_num_threads(), {}, {1: set(), 2: set()}
    real_factor, current = extract.layers.factor_layer, [0]

    def factor_layer(*args):
        factored_on[current[0]].add(threading.current_thread().name.split("_")[0])  # pool threads: name_N
        return real_factor(*args)

    monkeypatch.setattr(extract.layers, "factor_layer", factor_layer)
    try:
        for workers in (1, 2):
            torch.set_num_threads(workers)  # extract takes one worker per torch thread
            current[0] = workers
            paths = _extract(base, tuned, tmp_path / f"workers{workers}" / "lora.safetensors", svd=svd).outputs
            written[workers] = [load_file(path) for path in paths]
    finally:
        torch.set_num_threads(threads)
    assert factored_on == {1: {"MainThread"}, 2: {"xlbake-factor"}}
    for one, two in zip(written[1], written[2], strict=True):
        assert one.keys() == two.keys()
        assert all(torch.equal(one[key], two[key]) for key in one)



def test_the_reading_thread_runs_its_torch_ops_on_one_thread(changed, tmp_path, monkeypatch):
    """Its many small per-piece ops would each fork a team of threads, which spin between them while the layer
    workers want the cores (quick benchmark set at 2 threads: 11-17 CPU s with, 5.8 s without)."""
    base, tuned, _ = changed
    seen, real_pieces, threads = set(), CheckpointReader.pieces, torch.get_num_threads()

    def pieces(self, key, scratch):
        seen.add((threading.current_thread().name, torch.get_num_threads()))
        return real_pieces(self, key, scratch)

    monkeypatch.setattr(CheckpointReader, "pieces", pieces)
    try:
        torch.set_num_threads(2)
        _extract(base, tuned, tmp_path / "lora.safetensors")
        assert torch.get_num_threads() == 2  # the caller's setting is left alone
    finally:
        torch.set_num_threads(threads)
    assert seen == {(THREAD, 1)}
