"""Rank choice for one output file: a fixed rank, a per-layer criterion, or a global size budget.

Each layer comes with the singular values known for its difference (the top ``k`` of them, or all of them) and
its total energy (squared Frobenius norm), so kept fractions are always relative to the whole difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xlbake.errors import ConfigError
from xlbake.lora.lowrank import allocate_ranks, select_rank


@dataclass(frozen=True)
class LayerChoice:
    """What rank choice needs to know about one layer."""

    spectrum: Tensor  # (k,) known singular values of the difference, descending
    energy: float  # sum of ALL sigma^2 (squared Frobenius norm of the difference)
    cost: int  # parameters one rank costs: out + in * kh * kw
    cap: int  # largest rank allowed (<= len(spectrum) unless the difference is zero)
    floor: int = 0  # smallest rank required (1 for text-encoder modules, which must all be present)
    full: bool = False  # True when ``spectrum`` holds every singular value


def kept_fraction(layer: LayerChoice, rank: int) -> float:
    """Fraction of the layer's energy that rank ``rank`` keeps: sum(s[:rank]^2) / energy (1.0 for no energy)."""
    if layer.energy <= 0:
        return 1.0
    kept = float(layer.spectrum[:rank].double().square().sum())
    return min(1.0, kept / layer.energy)


def fixed_ranks(layers: Sequence[LayerChoice]) -> list[int]:
    """Every layer at its cap."""
    return [max(layer.cap, layer.floor) for layer in layers]


def criterion_ranks(layers: Sequence[LayerChoice], method: str, value: float) -> list[int]:
    """The minimal rank meeting ``method`` (sv_ratio, sv_fro, sv_cumulative) in each layer, within its cap."""
    ranks = []
    for layer in layers:
        if layer.energy <= 0 or layer.cap < 1:
            ranks.append(layer.floor)
            continue
        spectrum = layer.spectrum.float()
        if method == "sv_fro" and not layer.full:
            # the tail beyond the known values, as one value carrying its energy, so ratios use the whole norm
            tail = max(layer.energy - float(spectrum.double().square().sum()), 0.0) ** 0.5
            spectrum = torch.cat([spectrum, spectrum.new_tensor([tail])])
        ranks.append(max(layer.floor, select_rank(spectrum, method, value, layer.cap)))
    return ranks


def budget_ranks(layers: Sequence[LayerChoice], budget: int) -> list[int]:
    """Ranks whose parameters fit ``budget`` and keep the most total energy.

    Greedy allocation by sigma^2 per parameter (``lowrank.allocate_ranks``) above each layer's floor; the best
    single rank for every layer that fits is computed too and kept if it were better, so the result never keeps
    less than a fixed rank of the same size.
    """
    reserved = sum(layer.floor * layer.cost for layer in layers)
    if reserved > budget:
        raise ConfigError(
            f"size budget of {budget} parameters is below the {reserved} that one rank per text-encoder module "
            "needs (every module of an extracted encoder must be present); raise --size"
        )
    caps = [max(min(layer.cap, len(layer.spectrum)), layer.floor) for layer in layers]
    spectra = [layer.spectrum[layer.floor : cap].float() for layer, cap in zip(layers, caps, strict=True)]
    extra = allocate_ranks(
        spectra,
        [layer.cost for layer in layers],
        budget - reserved,
        [cap - layer.floor for layer, cap in zip(layers, caps, strict=True)],
    )
    greedy = [layer.floor + int(r) for layer, r in zip(layers, extra, strict=True)]
    uniform = best_uniform_ranks(layers, caps, budget)
    return greedy if total_kept(layers, greedy) >= total_kept(layers, uniform) else uniform


def best_uniform_ranks(layers: Sequence[LayerChoice], caps: Sequence[int], budget: int) -> list[int]:
    """The largest single rank r (each layer at min(max(r, floor), cap)) whose parameters fit ``budget``."""
    cap = np.asarray(caps, dtype=np.int64)
    floor = np.asarray([layer.floor for layer in layers], dtype=np.int64)
    cost = np.asarray([layer.cost for layer in layers], dtype=np.int64)
    candidates = np.arange(int(cap.max(initial=0)), 0, -1)
    for r in candidates:
        ranks = np.minimum(np.maximum(r, floor), cap)
        if int((ranks * cost).sum()) <= budget:
            return ranks.tolist()
    return floor.tolist()


def total_kept(layers: Sequence[LayerChoice], ranks: Sequence[int]) -> float:
    """Sum of kept sigma^2 over all layers."""
    return sum(float(layer.spectrum[:rank].double().square().sum()) for layer, rank in zip(layers, ranks, strict=True))
