"""LoRA size budgets and rank choice, shared by extract and resize.

``parse_size`` reads a ``--size`` budget: a LoRA file size (decimal: MB = 10^6 bytes, as file managers and
download pages show it; KiB/MiB/GiB are binary) or a number of LoRA parameters. GPU memory sizes are another
matter (binary whatever the spelling): see ``finetune.planner.report.parse_gib``.

``choose_ranks`` gives every layer of one output file its rank: a fixed rank, the minimal rank meeting a per-layer
criterion, or the allocation that keeps the most energy within a parameter budget (``lowrank.allocate_ranks``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from xlbake.errors import ConfigError
from xlbake.lora.lowrank import allocate_ranks, select_rank

BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_SIZE = re.compile(
    r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z]*?)\s*(params?)?\s*$",
    re.IGNORECASE,
)
_EXPECTED = "expected a file size like 100MB, 1.5GB, 64MiB or a parameter count like 50M or 20M params"


@dataclass(frozen=True)
class SizeBudget:
    """A global budget for one output: a file size in bytes, or a number of LoRA parameters."""

    amount: int
    unit: Literal["bytes", "params"]
    text: str  # as the user wrote it, e.g. "100MB" or "20M params"

    @property
    def label(self) -> str:
        """The budget as a file-name part: "50MB", "20Mparams"."""
        return re.sub(r"\s+", "", self.text)


def parse_size(text: str) -> SizeBudget:
    """``100MB``, ``1.5GB``, ``64MiB`` (bytes; KB/MB/GB are powers of 1000) or ``50M``, ``20M params``,
    ``1.5e3``, ``12500000`` (parameters); ValueError otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read {text!r}; {_EXPECTED}")
    number = float(match.group(1)) * 10 ** int(match.group(2) or 0)
    unit = match.group(3).lower()
    if unit in COUNT_UNITS:
        amount, kind = number * COUNT_UNITS[unit], "params"
    elif unit in BYTE_UNITS and not match.group(4):
        amount, kind = number * BYTE_UNITS[unit], "bytes"
    else:
        written = str(text)[match.start(3) :].strip()
        raise ValueError(f"unknown unit {written!r} in {text!r}; {_EXPECTED} (B, KB, MB, GB, KiB, MiB, GiB or K, M, G)")
    if amount < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return SizeBudget(int(amount), kind, str(text).strip())


@dataclass(frozen=True)
class LayerChoice:
    """What rank choice needs to know about one layer."""

    spectrum: Tensor  # (k,) known singular values of the difference, descending
    energy: float  # sum of ALL sigma^2 (squared Frobenius norm of the difference)
    cost: int  # parameters one rank costs: out + in * kh * kw
    cap: int  # largest rank allowed (<= len(spectrum) unless the difference is zero)
    floor: int = 0  # smallest rank required (e.g. 1 for text-encoder modules, which must all be present)
    full: bool = False  # True when ``spectrum`` holds every singular value


def choose_ranks(
    layers: Sequence[LayerChoice], method: str, value: float | None, budget_params: int | None
) -> list[int]:
    """Each layer's rank: the budget's allocation when ``budget_params`` is given, else the minimal rank meeting
    ``method`` (sv_ratio, sv_fro, sv_cumulative) with ``value``, else (method "fixed") each layer's cap."""
    if budget_params is not None:
        return budget_ranks(layers, budget_params)
    if method != "fixed":
        return criterion_ranks(layers, method, float(value or 0))
    return fixed_ranks(layers)


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


def reserved_params(layers: Sequence[LayerChoice]) -> int:
    """Parameters the layers' floors take before any budget is allocated."""
    return sum(layer.floor * layer.cost for layer in layers)


def budget_ranks(layers: Sequence[LayerChoice], budget: int) -> list[int]:
    """Ranks whose parameters fit ``budget`` and keep the most total energy.

    Greedy allocation by sigma^2 per parameter (``lowrank.allocate_ranks``) above each layer's floor; the best
    single rank for every layer that fits is computed too and kept if it were better, so the result never keeps
    less than a fixed rank of the same size.
    """
    reserved = reserved_params(layers)
    if reserved > budget:
        raise ConfigError(
            f"size budget of {budget} parameters is below the {reserved} that rank 1 in every module that must be "
            "present needs (every text-encoder module of an extraction, every layer of a resize); raise --size"
        )
    caps = [max(min(layer.cap, len(layer.spectrum)), layer.floor) for layer in layers]
    extra = allocate_ranks(
        [layer.spectrum[layer.floor : cap] for layer, cap in zip(layers, caps, strict=True)],
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


def kept_fraction(layer: LayerChoice, rank: int) -> float:
    """Fraction of the layer's energy that rank ``rank`` keeps: sum(s[:rank]^2) / energy (1.0 for no energy)."""
    if layer.energy <= 0:
        return 1.0
    kept = float(layer.spectrum[:rank].double().square().sum())
    return min(1.0, kept / layer.energy)
