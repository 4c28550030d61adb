"""The resize stage: re-factor every layer of a LoRA at a lower rank without ever forming its out x in matrix.

A layer's delta (alpha / r) * up @ down has rank <= r, so its SVD comes from the factors' r x r Grams and the
eigen-solve of a small r x r core (``xlbake.lora.factored.factor_svd``): the singular values kohya gets by
multiplying out and running a full SVD, at a fraction of the time and memory. The new factors are the top singular
triplets; the rank comes from a fixed value, a per-layer criterion or a global size budget. Every output is written
with one alpha and each layer's scale folded into its factors, the input's metadata updated, and a kept-energy
report.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from resize.config import ResizeConfig
from resize.metadata import COVERAGE_KEY, input_coverage, resized_metadata
from resize.plan import OutputPlan, keep_for, plan_outputs, target_text
from xlbake import __version__
from xlbake.devices import resolve_device
from xlbake.errors import InputError
from xlbake.fileio import check_output
from xlbake.lora.budget import LayerChoice, choose_ranks, reserved_params
from xlbake.lora.calibration import Calibration, moment_for, read_calibration
from xlbake.lora.factored import factor_svd
from xlbake.lora.io import (
    ALPHA,
    DOWN,
    HASH_KEY,
    SAVE_DTYPES,
    UP,
    LoraFile,
    LoraModule,
    module_component,
    read_lora,
    write_lora,
)
from xlbake.lora.lowrank import Svd, kept_energy, split_factors
from xlbake.lora.moments import moment_whitening
from xlbake.lora.parallel import in_parallel
from xlbake.lora.report import Coverage, LayerStat, group_stat, report_paths, write_report
from xlbake.lora.whiten import DAMPING, Factor, whitened_factor_svd
from xlbake.sdxl.tensorfile import safetensors_data_hash

COMPUTE_DTYPE = torch.float32
BYTES_PER_MB = 1_000_000
# A safetensors header entry is "KEY":{"dtype":"F16","shape":[SHAPE],"data_offsets":[A,B]}, : at most this much
# besides the key, the shape digits and the offsets.
_HEADER_ENTRY_BYTES = 52
_HEADER_ALIGN = 8  # the header is padded to a multiple of 8 bytes
_RECORD_SLACK = 256  # the record's numbers (kept energy, parameters, ranks) once the real ranks are known

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpectrum:
    """One input layer after the factor-space SVD of its delta (alpha / r) * up @ down."""

    name: str
    component: str  # "unet" | "te1" | "te2"
    kind: str  # "linear" | "conv1x1" | "conv3x3"
    down_shape: tuple[int, ...]  # the input's down: (r, in) or (r, in, kh, kw)
    spectrum: torch.Tensor  # (k,) every singular value of the delta, descending; k <= min(r, out, in * kh * kw)
    svd: Svd  # the top triplets kept for writing: u (out, t), s (t,), vh (t, in * kh * kw), t <= k

    @property
    def rank(self) -> int:
        """The delta's rank as stored: the most any output can keep."""
        return int(self.spectrum.numel())

    @property
    def cost_per_rank(self) -> int:
        """Parameters one rank costs: out + in * kh * kw."""
        return int(self.svd.u.shape[0] + self.svd.vh.shape[1])

    @property
    def energy(self) -> float:
        return float(self.spectrum.double().square().sum())


@dataclass(frozen=True)
class ResizeResult:
    """What one output holds."""

    path: Path
    layers: tuple[LayerStat, ...]
    kept_as_is: int  # layers whose rank was below the one asked for, written unchanged
    reports: tuple[Path, ...]  # report JSON and PNG, empty without a report
    coverage: Coverage | None = None  # what the input covered of its finetune, when its metadata says

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def run_resize(cfg: ResizeConfig, *, force: bool = False, progress: bool = False) -> list[ResizeResult]:
    """Resize ``cfg.lora`` into every planned output; check all outputs before any work, read the input once."""
    plans = plan_outputs(cfg)
    for path in [plan.path for plan in plans] + [p for plan in plans if cfg.report for p in report_paths(plan.path)]:
        check_output(path, force)
    device = resolve_device(cfg.device)
    lora = read_lora(cfg.lora)
    # the input's hash (a second of sha256 per GB, which releases the GIL) runs on another core while we factor
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing, start = pool.submit(safetensors_data_hash, lora.path), time.perf_counter()
        calibration = read_calibration(cfg.calibration, convs=cfg.calibrate_convs) if cfg.calibration else None
        layers = factorize(lora.modules, keep_for(plans), device, progress=progress, calibration=calibration)
        logger.info("factor-space SVD of %d layers: %.2f s", len(layers), time.perf_counter() - start)
        source_hash = hashing.result()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # writing is thousands of small ops, which split over threads cost far more CPU
    try:
        return [write_output(cfg, plan, layers, lora, source_hash, force=force) for plan in plans]
    finally:
        torch.set_num_threads(threads)


def factorize(
    modules: MutableMapping[str, LoraModule],
    keep: Callable[[str], int | None],
    device: torch.device,
    *,
    progress: bool = False,
    calibration: Calibration | None = None,
) -> list[LayerSpectrum]:
    """The factor-space SVD of every module's delta, in the modules' order.

    Consumes ``modules``. What is kept goes into one preallocated block (small long-lived tensors between large
    temporaries would fragment the heap). Whole layers go to ``torch.get_num_threads()`` workers of one thread each
    (:func:`xlbake.lora.parallel.in_parallel`).
    """
    sizes = {name: _kept_size(module, keep(module.kind)) for name, module in modules.items()}
    arena = torch.empty(sum(sizes.values()), dtype=COMPUTE_DTYPE)
    names, starts = list(modules), dict(zip(sizes, itertools.accumulate(sizes.values(), initial=0), strict=False))

    def factor_one(name: str, module: LoraModule) -> LayerSpectrum:
        moment = moment_for(calibration, name) if calibration else None
        whitening = None if moment is None else moment_whitening(moment, DAMPING)
        out, width = module.up.shape[0], math.prod(module.down.shape[1:])
        rank = min(out, width, module.rank)
        top = (sizes[name] - rank) // (out + width)
        svd = layer_svd(module, device, keep=top, whitening=whitening)
        spectrum, u, vh = torch.split(arena[starts[name] : starts[name] + sizes[name]], [rank, out * top, top * width])
        spectrum.copy_(svd.s)
        u, vh = u.view(out, top).copy_(svd.u[:, :top]), vh.view(top, width).copy_(svd.vh[:top])
        kept, shape = Svd(u=u, s=spectrum[:top], vh=vh), tuple(module.down.shape)
        return LayerSpectrum(name, module_component(name), module.kind, shape, spectrum, kept)

    jobs = ((name, modules.pop(name)) for name in names)  # an input layer goes once it is factored
    done = in_parallel(jobs, lambda job: factor_one(*job), workers=torch.get_num_threads())
    shown = None if progress else True  # None: a bar only on a terminal, so logs and pipes stay clean
    return list(tqdm(done, total=len(names), desc="factor SVD", unit="layer", disable=shown, leave=False))


def _kept_size(module: LoraModule, keep: int | None) -> int:
    """fp32 values ``factorize`` keeps of a layer: all k = min(out, in * kh * kw, r) of s, top min(keep, k) triplets."""
    out, width = module.up.shape[0], math.prod(module.down.shape[1:])
    rank = min(out, width, module.rank)
    top = rank if keep is None else min(keep, rank)
    return rank + top * (out + width)


def layer_svd(
    module: LoraModule, device: torch.device, keep: int | None = None, whitening: Factor | None = None
) -> Svd:
    """SVD of ``module``'s delta (alpha / r) * up @ down in fp32 on ``device``, from its factors only.

    s (k,) every singular value; u (out, t), vh (t, in * kh * kw) the top t = min(keep, k) triplets (all without
    ``keep``); conv kernels are flattened like ``xlbake.lora.lowrank.to_matrix``. With a ``whitening`` factor S
    (in, in), the SVD in the input-weighted metric (``whitened_factor_svd``: same total energy, vh mapped back so the
    truncations are the whitened optima).
    """
    up = module.up.to(device=device, dtype=COMPUTE_DTYPE).flatten(1)
    down = module.down.to(device=device, dtype=COMPUTE_DTYPE).flatten(1)
    if whitening is None:
        svd = factor_svd(up, down, keep)
        return Svd(u=svd.u, s=svd.s * module.scale, vh=svd.vh)  # scaling s, not up: one pass over up less
    svd = whitened_factor_svd(up, down, whitening)
    top = len(svd.s) if keep is None else min(keep, len(svd.s))
    return Svd(u=svd.u[:, :top], s=svd.s * module.scale, vh=svd.vh[:top])


def layer_choices(layers: Sequence[LayerSpectrum], plan: OutputPlan) -> list[LayerChoice]:
    """What rank choice needs of each layer: its whole spectrum, its cap under ``plan``, and rank 1 at least."""
    choices = []
    for layer in layers:
        cap = plan.cap(layer.kind)
        limit = layer.rank if cap is None else min(cap, layer.rank)
        choices.append(LayerChoice(layer.spectrum, layer.energy, layer.cost_per_rank, limit, floor=1, full=True))
    return choices


def params_within(
    file_bytes: int, layers: Sequence[LayerSpectrum], metadata: Mapping[str, str], save_dtype: torch.dtype
) -> int:
    """Factor parameters that fit a file of ``file_bytes``: what is left after an upper bound of the header
    (metadata, one entry per tensor, alignment) and the alpha values."""
    element = torch.tensor([], dtype=save_dtype).element_size()
    digits = len(str(file_bytes))  # data offsets are never longer than the file size
    meta = len(json.dumps({"__metadata__": {**metadata, HASH_KEY: "0" * 64}}, separators=(",", ":")))
    entries = 0
    for layer in layers:
        out, rank, inner = layer.svd.u.shape[0], layer.rank, layer.down_shape[1:]
        for suffix, shape in ((UP, (out, rank, 1, 1)), (DOWN, (rank, *inner)), (ALPHA, ())):
            entries += len(layer.name + suffix) + _HEADER_ENTRY_BYTES + len(",".join(map(str, shape))) + 2 * digits
    header = 8 + meta + _RECORD_SLACK + entries + _HEADER_ALIGN
    return (file_bytes - header - len(layers) * element) // element


def resized_factors(
    layers: Sequence[LayerSpectrum], ranks: Sequence[int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (up, down) with up @ down == the layer's rank-r truncation; shapes as the input's (convs 4-D)."""
    factors = {}
    for layer, rank in zip(layers, ranks, strict=True):
        up, down = split_factors(layer.svd, rank)
        down = down.reshape(rank, *layer.down_shape[1:])
        if layer.kind != "linear":
            up = up.reshape(up.shape[0], rank, 1, 1)
        factors[layer.name] = (up, down)
    return factors


def layer_stats(layers: Sequence[LayerSpectrum], ranks: Sequence[int]) -> list[LayerStat]:
    """What each layer keeps of the input LoRA's delta at its new rank."""
    return [
        LayerStat(
            name=layer.name,
            component=layer.component,
            rank=rank,
            energy=layer.energy,
            kept=kept_energy(layer.spectrum, rank),
            params=rank * layer.cost_per_rank,
            spectrum=tuple(layer.spectrum.tolist()),
        )
        for layer, rank in zip(layers, ranks, strict=True)
    ]


def kept_as_is(layers: Sequence[LayerSpectrum], ranks: Sequence[int], plan: OutputPlan) -> list[LayerSpectrum]:
    """Layers whose rank is below the one asked for: written unchanged, never zero-padded."""
    pairs = zip(layers, ranks, strict=True)
    return [layer for layer, rank in pairs if rank == layer.rank and _asked_above(layer, plan)]


def write_output(
    cfg: ResizeConfig,
    plan: OutputPlan,
    layers: Sequence[LayerSpectrum],
    source: LoraFile,
    source_hash: str,
    *,
    force: bool,
) -> ResizeResult:
    """Choose ranks for ``plan``, write its LoRA with updated metadata, and its report.

    ``source`` is the input file (its modules already consumed by ``factorize``): its metadata and path.
    """
    save_dtype = SAVE_DTYPES[cfg.save_precision]
    budget_params = plan_budget(cfg, plan, layers, source, source_hash)
    ranks = choose_ranks(layer_choices(layers, plan), cfg.method, cfg.value, budget_params)
    metadata, summary, stats = describe_output(cfg, plan, layers, ranks, source, source_hash)
    low = kept_as_is(layers, ranks, plan)
    if low:
        shown = ", ".join(map(str, sorted({layer.rank for layer in low})))
        logger.info(
            "%s: %d of %d layers already have a lower rank than asked (%s); they are kept as is, not padded",
            *(plan.path.name, len(low), len(layers), shown),
        )
    alpha = float(summary["alpha"])
    coverage = input_coverage(source)
    if coverage is not None:  # a resize of this file multiplies on from what this one keeps
        metadata[COVERAGE_KEY] = json.dumps(coverage.as_dict(stats))
    if cfg.calibration is not None:  # which statistics weighted the resize (their file; its header says the rest)
        metadata["xlbake_resize_calibration"] = json.dumps(
            {"file": cfg.calibration.name, "damping": DAMPING, "convs": "whitened" if cfg.calibrate_convs else "plain"}
        )
    write_lora(plan.path, resized_factors(layers, ranks), metadata=metadata, dtype=save_dtype, alpha=alpha, force=force)
    reports: tuple[Path, ...] = ()
    if cfg.report:
        title = f"{plan.path.name}: {summary['target']}"
        reports = write_report(plan.path, stats, summary, title=title, force=force, coverage=coverage)
    over = plan.budget is not None and plan.budget.unit == "bytes" and plan.path.stat().st_size > plan.budget.amount
    if over:
        logger.warning("%s: %d bytes, over the %s budget", plan.path, plan.path.stat().st_size, plan.budget.text)
    return ResizeResult(plan.path, tuple(stats), len(low), reports, coverage)


def plan_budget(
    cfg: ResizeConfig, plan: OutputPlan, layers: Sequence[LayerSpectrum], source: LoraFile, source_hash: str
) -> int | None:
    """Factor parameters ``plan``'s budget allows (None without one); refuse a budget below rank 1 everywhere."""
    if plan.budget is None:
        return None
    floor = reserved_params(layer_choices(layers, plan))
    too_small = f"size {plan.budget.text}: too small for this LoRA; rank 1 in each of its {len(layers)} layers needs"
    if plan.budget.unit == "params":
        if plan.budget.amount < floor:
            raise InputError(f"{too_small} {floor} parameters; ask for more")
        return plan.budget.amount
    save_dtype = SAVE_DTYPES[cfg.save_precision]
    rough, _, _ = describe_output(cfg, plan, layers, [1] * len(layers), source, source_hash)
    params = params_within(plan.budget.amount, layers, rough, save_dtype)
    if params < floor:
        need = plan.budget.amount + (floor - params) * torch.tensor([], dtype=save_dtype).element_size()
        raise InputError(f"{too_small} a file of about {need / BYTES_PER_MB:.3g} MB ({need} bytes); ask for more")
    return params


def describe_output(
    cfg: ResizeConfig,
    plan: OutputPlan,
    layers: Sequence[LayerSpectrum],
    ranks: Sequence[int],
    source: LoraFile,
    source_hash: str,
) -> tuple[dict[str, str], dict[str, object], list[LayerStat]]:
    """The header metadata, the summary (record and report) and the per-layer stats of an output at ``ranks``."""
    stats = layer_stats(layers, ranks)
    alpha = cfg.alpha if cfg.alpha is not None else float(max(ranks))
    low = len(kept_as_is(layers, ranks, plan))
    summary = _summary(cfg, plan, source, source_hash, stats, alpha=alpha, kept_as_is=low)
    metadata = resized_metadata(
        source.metadata,
        title=plan.path.stem,
        ranks={layer.name: rank for layer, rank in zip(layers, ranks, strict=True)},
        conv_names=[layer.name for layer in layers if layer.kind == "conv3x3"],
        alpha=alpha,
        record=summary,
        zero_names=[layer.name for layer in layers if layer.energy == 0],
    )
    return metadata, summary, stats


def _summary(
    cfg: ResizeConfig,
    plan: OutputPlan,
    source: LoraFile,
    source_hash: str,
    stats: Sequence[LayerStat],
    *,
    alpha: float,
    kept_as_is: int,
) -> dict[str, object]:
    """What was done, for the header record and the report (file names only: the file may be shared)."""
    total = group_stat(stats)
    return {
        "tool": f"xlbake {__version__} resize",
        "source": source.path.name,
        "source_sshs_model_hash": source_hash,
        "target": target_text(cfg, plan),
        "method": "size" if plan.budget is not None else cfg.method,
        "value": cfg.value,
        "rank": plan.rank,
        "conv_rank": plan.conv_rank,
        "size": plan.budget.text if plan.budget is not None else None,
        "alpha": alpha,
        "save_precision": cfg.save_precision,
        "ranks": {"min": total.min_rank, "max": total.max_rank},
        "params": total.params,
        "kept_energy": total.kept,
        "kept_as_is": kept_as_is,
    }


def _asked_above(layer: LayerSpectrum, plan: OutputPlan) -> bool:
    cap = plan.cap(layer.kind)
    return cap is not None and cap > layer.rank
