"""Per-component decisions: is the UNet's / each text encoder's difference worth extracting, and how noisy is it?

A component is extracted when its difference is at least ``min_diff`` of its weights (relative Frobenius size over
its LoRA layers), never from one absolute maximum as kohya does (``max |tuned - base| > 0.01``, which drops the
text encoders of every 1e-6-learning-rate finetune). Each decision is printed with its reason, what another
``--min-diff`` would change, and the rounding floor of the inputs beside the difference size.

Rounding floor: storing a weight ``w`` at a float format with machine epsilon ``eps`` (spacing of numbers in
[1, 2)) adds a uniform error of one unit in the last place, ulp(w) = eps * 2^floor(log2 |w|), so its RMS is
ulp / sqrt(12). For mantissas spread log-uniformly over [1, 2), E[(ulp / w)^2] = eps^2 * 3 / (8 ln 2), giving a
relative RMS error of ``eps * sqrt(3 / (8 ln 2) / 12)`` = 0.21 eps: 2.1e-4 for fp16, 1.7e-3 for bf16, 2.5e-8 for
fp32. Only the tuned file's rounding counts, assuming the finetune started from exactly the base file's values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

KOHYA_MIN_DIFF = 0.01
"""kohya's extract_lora_from_models default: a text encoder is used only if some |tuned - base| exceeds it."""
FLOOR_PER_EPS = math.sqrt(3 / (8 * math.log(2)) / 12)
"""Relative RMS rounding error of a stored weight, per machine epsilon of its format (see the module doc)."""
NOISE_WARNING = 0.1
"""Warn when the rounding floor is at least this fraction of the difference's relative size."""
TEXT_ENCODERS = ("te1", "te2")


@dataclass(frozen=True)
class LayerDiff:
    """Size of one layer's difference and weight, for the component totals."""

    component: str
    diff_energy: float  # ||tuned - base||_F^2
    weight_energy: float  # ||base||_F^2
    max_abs: float  # max |tuned - base| (text encoders only, for kohya's rule; 0 for the UNet)
    tuned_dtype: torch.dtype


@dataclass(frozen=True)
class ComponentDiff:
    """Totals of one component's LoRA layers."""

    component: str
    layers: int
    zero_layers: int
    diff_energy: float
    weight_energy: float
    max_abs: float
    floor_energy: float  # expected squared rounding error of the tuned weights
    dtypes: tuple[str, ...]  # tuned dtypes seen, e.g. ("fp16",)

    @property
    def rel(self) -> float:
        """||tuned - base|| / ||base|| over the component's LoRA layers."""
        return math.sqrt(self.diff_energy / self.weight_energy) if self.weight_energy > 0 else 0.0

    @property
    def floor(self) -> float:
        """Relative RMS rounding error of the tuned weights (same scale as ``rel``)."""
        return math.sqrt(self.floor_energy / self.weight_energy) if self.weight_energy > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    component: str
    extract: bool
    reason: str  # one line, printed
    warning: str | None = None


def rounding_floor(dtype: torch.dtype) -> float:
    """Relative RMS error of storing weights at ``dtype``."""
    return FLOOR_PER_EPS * torch.finfo(dtype).eps


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def component_totals(diffs: Iterable[LayerDiff]) -> dict[str, ComponentDiff]:
    """Sum layer differences per component, in the order they come."""
    groups: dict[str, list[LayerDiff]] = {}
    for diff in diffs:
        groups.setdefault(diff.component, []).append(diff)
    return {
        name: ComponentDiff(
            component=name,
            layers=len(group),
            zero_layers=sum(1 for d in group if d.diff_energy == 0),
            diff_energy=sum(d.diff_energy for d in group),
            weight_energy=sum(d.weight_energy for d in group),
            max_abs=max(d.max_abs for d in group),
            floor_energy=sum(d.weight_energy * rounding_floor(d.tuned_dtype) ** 2 for d in group),
            dtypes=tuple(sorted({dtype_name(d.tuned_dtype) for d in group})),
        )
        for name, group in groups.items()
    }


def decide(stat: ComponentDiff, min_diff: float) -> Decision:
    """Extract the component or not, with the printed reason and a rounding-noise warning when it applies."""
    name, rel = stat.component, stat.rel
    floor = f"rounding floor of the tuned {'/'.join(stat.dtypes)} weights {stat.floor:.1e}"
    if stat.diff_energy == 0:
        return Decision(
            name, False, f"{name}: skipped: unchanged (difference exactly zero in all {stat.layers} layers)"
        )
    if rel < min_diff:
        lower = 10 ** math.floor(math.log10(rel))
        return Decision(
            name,
            False,
            f"{name}: skipped: difference {rel:.1e} of its weights ({floor}) is below --min-diff {min_diff:g}; "
            f"--min-diff {lower:g} would extract it",
        )
    reason = (
        f"{name}: extracted: difference {rel:.1e} of its weights ({floor}); --min-diff above {rel:.1e} would skip it"
    )
    if name in TEXT_ENCODERS:
        verdict = "kept" if stat.max_abs > KOHYA_MIN_DIFF else "silently dropped"
        reason += f"; max |diff| {stat.max_abs:.1e}: kohya's rule (> {KOHYA_MIN_DIFF:g}) would have {verdict} it"
    return Decision(name, True, reason, _noise_warning(stat))


def _noise_warning(stat: ComponentDiff) -> str | None:
    if stat.floor < NOISE_WARNING * stat.rel:
        return None
    noise = min(1.0, (stat.floor / stat.rel) ** 2)
    return (
        f"warning: {stat.component}: its difference ({stat.rel:.1e} of its weights) is near the rounding floor of "
        f"the {'/'.join(stat.dtypes)} inputs ({stat.floor:.1e}): about {noise:.0%} of its energy is rounding noise, "
        "which the LoRA spends rank on; extract from fp32 files (the finetune stage writes tuned.fp32.safetensors)"
    )
