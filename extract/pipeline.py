"""The extract stage: stream base and tuned one layer at a time, factor each difference, write the LoRA file(s).

Memory: one layer's base, tuned and difference (plus its SVD workspace) at a time, and every layer's factors at
the largest rank any output needs, held at the save precision (that is the LoRA itself). kohya's
extract_lora_from_models loads both models whole in fp32 instead (22 GB resident for SDXL) and keeps every
difference. Several ranks come from one factorization: a truncated SVD's top-r part is the rank-r optimum.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from extract.calibrate import extract_calibration
from extract.components import Decision, LayerDiff, component_totals, decide
from extract.config import ExtractConfig
from extract.coverage import budget_notes, cap_notes, check_order, left_out_energies, variant_coverage
from extract.layers import FactorSettings, iter_layers
from extract.outputs import (
    Variant,
    budget_in_params,
    check_outputs,
    draft_metadata,
    plan_variants,
    write_variant,
)
from xlbake.data.meta import dataset_keys
from xlbake.errors import ConfigError, InputError
from xlbake.fingerprint import fingerprint
from xlbake.lora.calibration import calibration_info
from xlbake.lora.io import SAVE_DTYPES
from xlbake.lora.names import LoraTarget, kohya_targets
from xlbake.sdxl.checkpoint import CheckpointReader, open_checkpoint
from xlbake.sdxl.prediction import EPSILON, declared_prediction

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    outputs: tuple[Path, ...]
    decisions: tuple[Decision, ...]


def run_extract(cfg: ExtractConfig, *, force: bool = False, echo: Callable[[str], None] = LOG.info) -> ExtractResult:
    """Extract LoRA file(s) from ``cfg.base`` and ``cfg.tuned``; ``echo`` receives the lines meant for the user."""
    start = time.perf_counter()
    cfg.check_paths()
    variants = plan_variants(cfg)
    check_outputs(variants, force)
    if cfg.base.resolve() == cfg.tuned.resolve():
        raise InputError(f"{cfg.tuned}: is the same file as --base; pass the finetuned model as --tuned")
    calibration = extract_calibration(cfg, echo)
    settings = replace(FactorSettings.from_config(cfg), calibration=calibration)
    with open_checkpoint(cfg.base) as base, open_checkpoint(cfg.tuned) as tuned:
        if not cfg.allow_swapped:
            check_order(base, tuned)
        targets = extraction_targets(base, tuned, conv=settings.conv_rank > 0, extra=cfg.extra_layers)
        for line in [*cap_notes(variants, targets), *check_budgets(cfg, variants, targets)]:
            echo(line)
        sources = {name: {"file": path.name, "fingerprint": fingerprint(path)} for name, path in _inputs(cfg)}
        prediction = lora_prediction(base, tuned, echo)
        dataset = dataset_keys(tuned.metadata)  # the finetune's tag counts, folders and triggers, as kohya writes them
        echo(f"factoring {len(targets)} layers ({settings.svd} SVD, rank {settings.rank}, on {settings.device})")
        layers, diffs = [], []
        for layer, diff in tqdm(
            iter_layers(base, tuned, targets, settings),
            total=len(targets),
            unit="layer",
            disable=not sys.stderr.isatty(),  # a bar only on a terminal; logs and errors stay one line each
            leave=False,
        ):
            layers.append(layer)
            diffs.append(diff)
        left_out = left_out_energies(base, tuned, {target.key for target in targets})
    decisions = tuple(decide(stat, cfg.min_diff) for stat in component_totals(diffs).values())
    for decision in decisions:
        echo(decision.reason)
        if decision.warning:
            echo(decision.warning)
    extracted = {d.component for d in decisions if d.extract}
    if not extracted:
        raise InputError(_nothing_changed(cfg, diffs))
    info = {
        "sources": sources,
        "components": {d.component: d.reason.split(": ", 1)[1] for d in decisions},
        "svd": settings.svd,
        "prediction": prediction,
        "dataset": dataset,
        "factor_seconds": round(time.perf_counter() - start, 2),
        "calibration": calibration_info(calibration) if calibration else None,
    }
    outputs = tuple(
        write_variant(
            variant,
            layers,
            cfg=cfg,
            extracted=extracted,
            info=info,
            force=force,
            echo=echo,
            coverage=lambda held: variant_coverage(layers, held, left_out),
        )
        for variant in variants
    )
    echo(f"done in {time.perf_counter() - start:.1f} s")
    return ExtractResult(outputs, decisions)


def lora_prediction(base: CheckpointReader, tuned: CheckpointReader, echo: Callable[[str], None]) -> str:
    """What base + LoRA predicts, for the LoRA's label: what ``tuned`` declares, else what ``base`` does, else
    epsilon. Says so when they differ (a finetune that changed the prediction type)."""
    tuned_says, base_says = declared_prediction(tuned), declared_prediction(base)
    if tuned_says and base_says and tuned_says.prediction != base_says.prediction:
        echo(
            f"note: {tuned.path} is {tuned_says.prediction} ({tuned_says.where}), {base.path} is "
            f"{base_says.prediction}: the LoRA is labelled {tuned_says.prediction}; sample with a matching scheduler"
        )
    declared = tuned_says or base_says
    return declared.prediction if declared else EPSILON


def check_budgets(cfg: ExtractConfig, variants: Sequence[Variant], targets: Sequence[LoraTarget]) -> list[str]:
    """ConfigError for a size budget that cannot hold even the file's header; a line for each budget the rank caps
    reach first. From the headers alone, before any SVD."""
    itemsize = SAVE_DTYPES[cfg.save_precision].itemsize

    def params(variant: Variant, names: list[str]) -> int:
        return budget_in_params(variant, names, draft_metadata(variant, cfg, names), itemsize)

    budgeted = [variant for variant in variants if variant.budget is not None]
    smallest = min(target.shape[0] + math.prod(target.shape[1:]) for target in targets)
    for variant in budgeted:
        if params(variant, []) < smallest:  # a lower bound: the metadata alone, no module's header entries
            raise ConfigError(f"size: {variant.budget.text} cannot hold one rank of the smallest layer; ask for more")

    def params_or_zero(variant: Variant, names: list[str]) -> int:
        try:
            return params(variant, names)
        except ConfigError:  # the header of every module does not fit: the budget, not the caps, limits the file
            return 0

    return budget_notes(budgeted, targets, params_or_zero)


def extraction_targets(base: CheckpointReader, tuned: CheckpointReader, *, conv: bool, extra: bool) -> list[LoraTarget]:
    """kohya's LoRA layers of ``base``; InputError naming the first layer ``tuned`` lacks or shapes differently."""
    base_shapes, tuned_shapes = base.shapes(), tuned.shapes()
    targets = kohya_targets(base_shapes, conv=conv, extra=extra)
    if not targets:
        raise InputError(f"{base.path}: no LoRA layers found (kohya's SDXL module set); is it an SDXL checkpoint?")
    for target in targets:
        for reader, shapes in ((base, base_shapes), (tuned, tuned_shapes)):
            if target.key in shapes and not reader.dtype(target.key).is_floating_point:
                raise InputError(
                    f"{reader.path}: {target.key} is stored as {reader.dtype(target.key)}, not a float type; "
                    "export the checkpoint as fp32/fp16/bf16 safetensors"
                )
        shape, other = base_shapes[target.key], tuned_shapes.get(target.key)
        if other is None:
            raise InputError(
                f"{tuned.path}: has no {target.key} ({base.path} has it, shape {list(shape)}); "
                "base and tuned must be the same architecture"
            )
        if other != shape:
            raise InputError(
                f"{tuned.path}: {target.key} has shape {list(other)} but {list(shape)} in {base.path}; "
                "base and tuned must be the same architecture"
            )
    known = {target.key for target in targets}
    surplus = sorted({t.key for t in kohya_targets(tuned_shapes, conv=conv, extra=extra)} - known)
    if surplus:
        raise InputError(
            f"{tuned.path}: has {surplus[0]}, which {base.path} lacks; base and tuned must be the same architecture"
        )
    return targets


def _inputs(cfg: ExtractConfig) -> list[tuple[str, Path]]:
    return [("base", cfg.base), ("tuned", cfg.tuned)]


def _nothing_changed(cfg: ExtractConfig, diffs: Sequence[LayerDiff]) -> str:
    if all(d.diff_energy == 0 for d in diffs):
        return (
            f"{cfg.tuned}: identical to {cfg.base} in all {len(diffs)} LoRA layers; nothing to extract "
            "(is --tuned the finetuned model?)"
        )
    return f"no component's difference reaches --min-diff {cfg.min_diff:g} (see above); lower --min-diff"
