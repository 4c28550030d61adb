"""The layer loop of extract: read each layer's difference (a thread reading ahead), factor it (several layers at
once on a CPU), and hand back its factors in order; how each layer is factored (`FactorSettings`).

Memory: the layer being read, the layers being factored with their SVD workspaces, nothing else; the caller keeps
the factors.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from extract.calibrate import whitening_for
from extract.components import TEXT_ENCODERS, LayerDiff
from extract.config import ExtractConfig
from extract.outputs import LayerResult
from extract.prefetch import prefetched
from xlbake.devices import resolve_device
from xlbake.errors import InputError
from xlbake.lora.buffers import SVD_KEEP_BYTES, Buffers
from xlbake.lora.calibration import Calibration
from xlbake.lora.io import SAVE_DTYPES
from xlbake.lora.krylov import sketch_dtype, svd_adaptive
from xlbake.lora.lowrank import Svd, split_factors, svd_exact, to_matrix
from xlbake.lora.names import LoraTarget
from xlbake.lora.parallel import in_parallel
from xlbake.lora.whiten import unwhiten, whiten_scaled
from xlbake.sdxl.checkpoint import CheckpointReader

_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
COMPUTE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
PREFETCH_LAYERS = 1
"""Layers whose differences a thread reads ahead while one is factored (reads and torch ops release the GIL). Each
costs one layer's fp32 difference, at most ~120 MB in SDXL (a 2560 -> 1280 3x3 conv)."""
TRIM_EVERY = 4
"""Layers factored between two returns of freed heap memory to the system (see release_freed_memory)."""
PIECE_BYTES = 1 << 20
"""File bytes read at a time into the scratch buffer: small enough to stay in cache while converted, large enough
that the per-piece Python overhead is negligible (256 KiB, 1 MiB, 4 MiB measured within 5 %)."""
MAX_WORKERS = 4
"""Layers factored at once on a CPU (one per torch thread, at most this many): each holds its difference and SVD
workspace (up to ~0.3 GiB for SDXL's largest), so more would grow the peak memory more than the speed."""


@dataclass(frozen=True)
class FactorSettings:
    """How each layer's difference is factored."""

    rank: int  # largest Linear / 1x1 conv rank any output needs
    conv_rank: int  # largest 3x3 conv rank (0: no 3x3 convs)
    svd: str  # "fast" | "exact"
    dtype: torch.dtype  # precision of the difference and its SVD
    device: torch.device
    hold_dtype: torch.dtype  # precision the factors are kept at until written
    power_iters: int
    oversample: int
    seed: int
    full_spectrum: bool  # every singular value is needed (sv_cumulative)
    calibration: Calibration | None = None  # input statistics: whitened (activation-aware) factorization
    sketch: torch.dtype | None = None  # dtype of the fast SVD's Krylov products (None: dtype)
    prefetch: int = 0  # layers read ahead by a thread while one is factored (0: no thread)
    workers: int = 1  # layers factored at once, each on its own thread (CPU only)

    @classmethod
    def from_config(cls, cfg: ExtractConfig) -> FactorSettings:
        device = resolve_device(cfg.device)
        save = SAVE_DTYPES[cfg.save_precision]
        return cls(
            rank=max(cfg.dim),
            conv_rank=max(cfg.conv_dims()),
            svd=cfg.svd,
            dtype=COMPUTE_DTYPES[cfg.precision],
            device=device,
            hold_dtype=torch.float32 if save == torch.float32 else save,
            power_iters=cfg.power_iters,
            oversample=cfg.oversample,
            seed=cfg.seed,
            full_spectrum=cfg.rank_method == "sv_cumulative",
            sketch=sketch_dtype(cfg.sketch_precision, COMPUTE_DTYPES[cfg.precision], device),
            prefetch=PREFETCH_LAYERS,
            workers=min(torch.get_num_threads(), MAX_WORKERS) if device.type == "cpu" else 1,
        )


def iter_layers(
    base: CheckpointReader, tuned: CheckpointReader, targets: Sequence[LoraTarget], settings: FactorSettings
) -> Iterator[tuple[LayerResult, LayerDiff]]:
    """Factor each target's difference (``settings.workers`` at once), while a thread reads the next
    ``settings.prefetch`` ones; results in the targets' order."""
    layers = prefetched(layer_differences(base, tuned, targets, settings), settings.prefetch)
    local = threading.local()  # a pool of the SVD's buffers per worker thread, freed with this loop

    def factor(layer: tuple[LoraTarget, Tensor, LayerDiff]) -> tuple[LayerResult, LayerDiff]:
        target, diff, stats = layer
        if not hasattr(local, "buffers"):
            local.buffers = Buffers(SVD_KEEP_BYTES)
        return factor_layer(target, diff, stats.diff_energy, settings, local.buffers), stats

    threads_each = max(1, torch.get_num_threads() // settings.workers)
    try:
        for done, item in enumerate(in_parallel(layers, factor, settings.workers, threads_each), start=1):
            if done % TRIM_EVERY == 0:
                release_freed_memory()
            yield item
    finally:  # the reading thread joined now, not when an error's traceback lets go of this frame
        layers.close()


def release_freed_memory() -> None:
    """Hand the free pages inside the C heap back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    The SVD's temporaries of a few MB to 32 MB come from the heap (glibc raises its mmap threshold up to 32 MB),
    and the small factors kept between them stop it from shrinking: over SDXL's 1052 layers resident memory grew
    ~0.5 GiB above what is live (measured, dim 128 + conv 128: peak 1.99 GiB; trimmed every layer 1.49 GiB at +12 %
    CPU; every 4 layers 1.56 GiB at no measurable CPU cost).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def layer_differences(
    base: CheckpointReader, tuned: CheckpointReader, targets: Sequence[LoraTarget], settings: FactorSettings
) -> Iterator[tuple[LoraTarget, Tensor, LayerDiff]]:
    """Each target's difference matrix (out, n) and statistics; a fused weight (TE2 in_proj) is read once for its
    q, k, v. InputError for NaN/Inf in either file. The differences' memory is reused once nothing holds it."""
    key, cached, buffers, scratch = None, None, Buffers(), torch.empty(PIECE_BYTES, dtype=torch.uint8)
    for target in targets:
        if target.key != key:
            key, cached = target.key, None  # drop the previous layer before reading the next
            cached = read_difference(base, tuned, target.key, settings, buffers, scratch)
        diff, row_energy = cached
        if target.rows is not None:
            diff, row_energy = diff[target.rows[0] : target.rows[1]], row_energy[target.rows[0] : target.rows[1]]
        energy = float(torch.linalg.vector_norm(diff)) ** 2
        if not math.isfinite(energy):  # the base is finite (checked on reading): NaN/Inf came from the tuned file
            raise InputError(f"{tuned.path}: {target.key} holds NaN/Inf values; the checkpoint is broken, re-save it")
        # max |diff| only matters for kohya's text-encoder rule, which the decisions quote
        max_abs = _max_abs(diff) if target.component in TEXT_ENCODERS else 0.0
        yield target, diff, LayerDiff(target.component, energy, float(row_energy.sum()), max_abs, tuned.dtype(key))


def _max_abs(diff: Tensor) -> float:
    """max |diff| of a finite tensor, exactly, from one vectorized min/max pass (vector_norm's ord=inf took 2.6 ns
    per element, aminmax 0.15: measured at 1 thread on 1280x1280 and 10240x1280 fp32)."""
    low, high = torch.aminmax(diff)
    return max(abs(float(low)), abs(float(high)))


def read_difference(
    base: CheckpointReader,
    tuned: CheckpointReader,
    key: str,
    settings: FactorSettings,
    buffers: Buffers,
    scratch: Tensor,
) -> tuple[Tensor, Tensor]:
    """(tuned - base) as a matrix (out, in*kh*kw) and the base weight's squared row norms (out,), fp64.

    Both files are read piece by piece into ``scratch`` (uint8) and converted into one buffer of ``buffers``: the base,
    then tuned - base in place, with the very arithmetic of a whole-tensor ``tuned - base`` (each piece promoted as
    the whole would be). layer_differences over the quick benchmark set (40 SDXL-shaped fp16 layers, 1 thread):
    1.15-1.28 CPU s with fresh whole-tensor buffers (each page faulting on first touch, and the mixed-dtype
    subtraction allocating a widened copy of tuned), 0.40-0.44 s this way. NaN/Inf in the base shows in its norms
    (it propagates into them), without an extra pass over the tensor.
    """
    weight = buffers.take(base.shape(key), settings.dtype, settings.device)
    flat = weight.view(-1)
    for start, piece in _placed(base.pieces(key, scratch)):
        flat[start : start + piece.numel()].copy_(piece)
    row_energy = torch.linalg.vector_norm(to_matrix(weight), dim=1).double().square()
    if not math.isfinite(float(row_energy.sum())):
        raise InputError(f"{base.path}: {key} holds NaN/Inf values; the checkpoint is broken, re-save it")
    for start, piece in _placed(tuned.pieces(key, scratch)):
        part = flat[start : start + piece.numel()]
        torch.sub(piece.to(settings.device), part, out=part)
    return to_matrix(weight), row_energy


def _placed(pieces: Iterator[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """Each piece of a flattened tensor with the index of its first element."""
    start = 0
    for piece in pieces:
        yield start, piece
        start += piece.numel()


def factor_layer(
    target: LoraTarget, diff: Tensor, energy: float, settings: FactorSettings, workspace: Buffers | None = None
) -> LayerResult:
    """Top-rank SVD factors of one difference matrix (out, n) of squared norm ``energy``; an exactly zero
    difference is not factored (its factors have rank 0). ``workspace``: the fast SVD's memory, reused by the
    calling thread from layer to layer."""
    if energy == 0 and not diff.any():
        empty = torch.zeros(0, dtype=settings.hold_dtype)
        return LayerResult(target, empty.reshape(diff.shape[0], 0), empty.reshape(0, diff.shape[1]), empty, 0.0, True)
    rank = min(settings.conv_rank if target.kind == "conv3x3" else settings.rank, *diff.shape)
    whitening = whitening_for(settings.calibration, target)
    if whitening is not None:  # factor ΔW S' (same energy as ΔW: see whiten_scaled), then map down back
        diff, whitening = whiten_scaled(diff, whitening)
    svd = truncated_svd(diff, rank, settings, energy=energy if whitening is None else None, workspace=workspace)
    spectrum, full = svd.s, svd.s.numel() == min(diff.shape)
    if settings.full_spectrum and not full:
        spectrum, full = torch.linalg.svdvals(diff), True
    up, down = split_factors(svd, rank)
    down = down if whitening is None else unwhiten(down, whitening)
    hold = settings.hold_dtype
    return LayerResult(
        target, up.to("cpu", hold), down.to("cpu", hold), spectrum.to("cpu", torch.float32), energy, full
    )


def truncated_svd(
    m: Tensor, rank: int, settings: FactorSettings, energy: float | None = None, workspace: Buffers | None = None
) -> Svd:
    """Exact (all values when the full spectrum is needed) or randomized top-``rank`` SVD of ``m``: block Krylov
    with at least ``power_iters`` blocks, more until its error estimate settles, its products with ``m`` in the
    ``sketch`` dtype (xlbake.lora.krylov.svd_adaptive); ``energy``, ||m||² if known."""
    if settings.svd == "exact":
        return svd_exact(m, min(m.shape) if settings.full_spectrum else rank)
    iters = max(1, settings.power_iters)
    return svd_adaptive(
        m,
        rank,
        oversample=settings.oversample,
        min_iters=iters,
        seed=settings.seed,
        sketch=settings.sketch,
        energy=energy,
        workspace=workspace,
    )
