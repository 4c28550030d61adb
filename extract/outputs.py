"""What the extract stage writes: which files (one per rank or budget), their ranks, LoRA tensors, metadata, report.

Every output path (LoRA, report JSON, report PNG) is checked before any expensive work, and each file is written
atomically through :mod:`xlbake.lora.io` / :mod:`xlbake.lora.report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from extract.components import TEXT_ENCODERS
from extract.config import ExtractConfig
from xlbake import __version__
from xlbake.config import to_dict
from xlbake.errors import ConfigError
from xlbake.fileio import check_output
from xlbake.lora.budget import LayerChoice, SizeBudget, choose_ranks, fixed_ranks, kept_fraction, parse_size
from xlbake.lora.io import SAVE_DTYPES, lora_metadata, write_lora
from xlbake.lora.lowrank import clamp_quantile, reshape_factors
from xlbake.lora.names import LoraTarget
from xlbake.lora.report import (
    Coverage,
    LayerStat,
    by_component,
    group_stat,
    print_summary,
    report_paths,
    write_report,
)
from xlbake.sdxl.prediction import EPSILON

HEADER_BYTES_PER_TENSOR = 120
"""Upper bound of one tensor's safetensors header entry beyond its name (dtype, shape, offsets, JSON syntax)."""
HEADER_SLACK = 4096
"""Bytes reserved for metadata lora_io adds (ss_* keys, modelspec, hash) and rounding of the estimate."""
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class Variant:
    """One output file: its label, path, ranks (largest per layer) and optional size budget."""

    label: str  # "dim32", or the budget text such as "100MB"
    path: Path
    dim: int
    conv_dim: int
    budget: SizeBudget | None


@dataclass(frozen=True)
class LayerResult:
    """One layer's factored difference, held until the files are written."""

    target: LoraTarget
    up: Tensor  # (out, k) = u * sqrt(s), k = the largest rank any output needs (0 when the difference is zero)
    down: Tensor  # (k, in * kh * kw) = sqrt(s) * vh
    spectrum: Tensor  # (k,) singular values, or all of them when ``full``
    energy: float  # ||tuned - base||_F^2
    full: bool


def plan_variants(cfg: ExtractConfig) -> list[Variant]:
    """The files this run writes: one per ``dim`` (``<stem>-dim16.safetensors`` when there are several; with
    several conv dims too, ``<stem>-dim16-conv8.safetensors``)."""
    budget = parse_size(cfg.size) if cfg.size is not None else None
    varied_conv = len(set(cfg.conv_dims())) > 1
    variants = []
    for dim, conv_dim in zip(cfg.dim, cfg.conv_dims(), strict=True):
        label = budget.text if budget is not None else f"dim{dim}" + (f"-conv{conv_dim}" if varied_conv else "")
        path = cfg.out if len(cfg.dim) == 1 else cfg.out.with_name(f"{cfg.out.stem}-{label}{cfg.out.suffix}")
        variants.append(Variant(label, path, dim, conv_dim, budget))
    paths = [v.path for v in variants]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"dim: {list(cfg.dim)} repeats a rank, which would write the same file twice")
    return variants


def check_outputs(variants: Sequence[Variant], force: bool) -> None:
    """Refuse existing outputs (without ``force``) and unwritable folders before any work."""
    for variant in variants:
        for path in (variant.path, *report_paths(variant.path)):
            check_output(path, force)


def layer_choices(
    layers: Sequence[LayerResult], variant: Variant, extracted: set[str]
) -> list[tuple[LayerResult, LayerChoice]]:
    """The layers this file may hold, with their caps; text-encoder modules get at least rank 1 (A1111 and
    diffusers need all modules of an extracted encoder), UNet layers with a zero difference are left out."""
    chosen = []
    for layer in layers:
        target = layer.target
        if target.component not in extracted or (target.kind == "conv3x3" and variant.conv_dim == 0):
            continue
        floor = 1 if target.component in TEXT_ENCODERS else 0
        k = layer.up.shape[1]
        if k == 0 and not floor:
            continue
        cap = min(variant.conv_dim if target.kind == "conv3x3" else variant.dim, k) if k else 1
        cost = target.shape[0] + math.prod(target.shape[1:])
        chosen.append((layer, LayerChoice(layer.spectrum, layer.energy, cost, cap, floor, layer.full)))
    return chosen


def budget_in_params(variant: Variant, names: Sequence[str], metadata: Mapping[str, str], save_bytes: int) -> int:
    """A size budget as LoRA parameters, after the header and alpha tensors (estimated from above)."""
    assert variant.budget is not None
    if variant.budget.unit == "params":
        return variant.budget.amount
    header = sum(len(name) + len(suffix) + HEADER_BYTES_PER_TENSOR for name in names for suffix in SUFFIXES)
    overhead = 8 + header + len(json.dumps(dict(metadata))) + HEADER_SLACK + save_bytes * len(names)
    if variant.budget.amount <= overhead:
        raise ConfigError(f"size: {variant.budget.text} does not even hold the file's header (~{overhead} bytes)")
    return (variant.budget.amount - overhead) // save_bytes


def draft_metadata(variant: Variant, cfg: ExtractConfig, names: Sequence[str]) -> dict[str, str]:
    """The file's metadata before ranks, sources and kept energy are known (for size estimates)."""
    return _metadata(variant, cfg, names, [variant.dim] * len(names), [], {}, 1.0)


def module_factors(layer: LayerResult, rank: int, clamp: float) -> tuple[Tensor, Tensor]:
    """(up, down) in the weight's LoRA layout at ``rank``, zeros for an unchanged text-encoder module.

    Views of the held factors where possible (no copy of the whole LoRA: write_lora casts module by module).
    """
    target = layer.target
    if layer.up.shape[1] == 0:
        up = torch.zeros(target.shape[0], rank)
        down = torch.zeros(rank, math.prod(target.shape[1:]))
    else:
        up, down = layer.up[:, :rank], layer.down[:rank]
        if clamp < 1:
            up, down = clamp_quantile(up.float(), down.float(), clamp)
    return reshape_factors(up, down, target.shape)


def write_variant(
    variant: Variant,
    layers: Sequence[LayerResult],
    *,
    cfg: ExtractConfig,
    extracted: set[str],
    info: Mapping[str, object],
    force: bool,
    echo: Callable[[str], None],
    coverage: Callable[[set[str]], Coverage],
) -> Path:
    """Choose ranks, write the LoRA file and its report; print the kept-energy summary.

    ``coverage(names)``: the share of the finetune in the layers of those names (see ``extract.coverage``).
    """
    chosen = layer_choices(layers, variant, extracted)
    choices = [choice for _, choice in chosen]
    save_dtype = SAVE_DTYPES[cfg.save_precision]
    draft = _metadata(variant, cfg, [layer.target.name for layer, _ in chosen], fixed_ranks(choices), [], info, 1.0)
    budget = None
    if variant.budget is not None:
        names = [layer.target.name for layer, _ in chosen]
        budget = budget_in_params(variant, names, draft, save_dtype.itemsize)
    ranks = choose_ranks(choices, cfg.rank_method, cfg.rank_value, budget)
    kept = [(layer, choice, rank) for (layer, choice), rank in zip(chosen, ranks, strict=True) if rank > 0]
    if not kept:
        raise ConfigError(f"{variant.path}: no layer gets a rank (size {variant.label} too small?); raise --size/--dim")
    stats = [
        LayerStat(
            name=layer.target.name,
            component=layer.target.component,
            rank=rank,
            energy=layer.energy,
            kept=kept_fraction(choice, rank),
            params=rank * choice.cost,
            spectrum=tuple(layer.spectrum[: max(choice.cap, 1)].tolist()),
        )
        for layer, choice, rank in kept
    ]
    factors = {layer.target.name: module_factors(layer, rank, cfg.clamp_quantile) for layer, _, rank in kept}
    names = [layer.target.name for layer, _, _ in kept]
    zero = frozenset(layer.target.name for layer, _, _ in kept if layer.up.shape[1] == 0)
    convs = frozenset(layer.target.name for layer, _, _ in kept if layer.target.kind == "conv3x3")
    alpha = float(max(rank for _, _, rank in kept))  # one alpha for every module; lora_io folds the scales
    covers = coverage(set(names))
    metadata = _metadata(variant, cfg, names, [rank for _, _, rank in kept], stats, info, alpha, zero, convs)
    metadata["xlbake_coverage"] = json.dumps(_rounded(covers.as_dict(stats)))  # resize carries it forward
    write_lora(variant.path, factors, metadata=metadata, dtype=save_dtype, alpha=alpha, force=force)
    summary = {
        **info,
        "output": variant.label,
        "save_precision": cfg.save_precision,
        "size": variant.budget.text if variant.budget else None,
        "budget_params": budget,
        "options": to_dict(cfg),  # the resolved config, config_version included
    }
    write_report(variant.path, stats, summary, title=variant.path.stem, force=force, coverage=covers)
    size_mb = variant.path.stat().st_size / 1e6
    table = print_summary(stats, summary, covers)
    echo(f"wrote {variant.path} ({len(factors)} modules, {size_mb:.2f} MB)\n{table}")
    return variant.path


def _rounded(value: object) -> object:
    """Floats of a JSON-able value to 6 digits (metadata is text in every LoRA header)."""
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 6) if isinstance(value, float) else value


def _metadata(
    variant: Variant,
    cfg: ExtractConfig,
    names: Sequence[str],
    ranks: Sequence[int],
    stats: Sequence[LayerStat],
    info: Mapping[str, object],
    alpha: float,
    zero_names: frozenset[str] = frozenset(),
    conv_names: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """kohya ss_*/modelspec metadata plus ours: options, sources, per-component decisions and kept energy."""
    # modules of an unchanged layer (zero rank-1 padding of an extracted encoder) do not make the ranks "Dynamic"
    rank_map = {name: rank for name, rank in zip(names, ranks, strict=True) if name not in zero_names}
    rank_map = rank_map or {"none": variant.dim}
    options = to_dict(cfg)
    for key in ("base", "tuned", "out", "calibration", "calibrate"):  # names only: not the user's folders
        options[key] = Path(options[key]).name if options.get(key) else options.get(key)
    kept = {name: group_stat(group).kept for name, group in by_component(stats).items()}
    if stats:
        kept["total"] = group_stat(stats).kept
    extra = {
        "xlbake_version": __version__,
        "xlbake_extract": json.dumps({**options, "output": variant.label}),
        "xlbake_sources": json.dumps(info.get("sources", {})),
        "xlbake_components": json.dumps(info.get("components", {})),
        "xlbake_kept_energy": json.dumps({k: round(v, 6) for k, v in kept.items()}),
        **info.get("dataset", {}),  # type: ignore[dict-item]
    }
    if info.get("calibration"):
        extra["xlbake_calibration"] = json.dumps(info["calibration"])
    conv_rank = variant.conv_dim if variant.conv_dim > 0 else None
    prediction = str(info.get("prediction", EPSILON))
    return lora_metadata(
        title=variant.path.stem,
        ranks=rank_map,
        alpha=alpha,
        conv_rank=conv_rank,
        extra=extra,
        conv_names=conv_names,
        prediction=prediction,
    )
