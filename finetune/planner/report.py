"""The plan as a printable table, the changes that make a plan fit, and what the CLI needs around them: GPU
sizes, launch settings, dataset counts.

    python -m finetune --config C --plan [--gpu-memory 80GB] [--gpus N] [--accelerate-config A]

``plan_text`` prints a plan for a GPU named on the command line; ``check_before_training`` plans the running
launch (the CUDA device's size, WORLD_SIZE, accelerate's DeepSpeed variables) and refuses one that cannot fit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from finetune.config import FinetuneConfig, builtin_name
from finetune.planner.measure import model_parts
from finetune.planner.memory import (
    GIB,
    DatasetStats,
    DeepSpeedSetup,
    Plan,
    Suggestion,
    memory_lines,
    plan,
    totals,
    verdict_for,
)
from finetune.planner.speed import SDXL_IMAGES_PER_SECOND
from xlbake.errors import ConfigError, InputError, TrainingError, XlbakeError

GPU_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
"""GPU sizes are binary whatever the spelling: an "80GB" A100 has 80 GiB (nvidia-smi: 81920 MiB). LoRA file sizes
(``--size``) are decimal instead: ``xlbake.lora.budget.parse_size``."""
GPU_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
LABEL_WIDTH, NUMBER_WIDTH = 52, 11
DEFAULT_GPU = "80GB"


def parse_gib(text: str) -> int:
    """Bytes of a GPU memory size, binary whatever the spelling: "80GB" = "80 GiB" = "81920MiB" = 80 * 2**30,
    "48G" = 48 GiB; a bare number is bytes ("85899345920"). ConfigError otherwise."""
    match = GPU_SIZE.match(str(text))
    if not match:
        raise ConfigError(f"--gpu-memory: cannot read {text!r} as a size; write e.g. 80GB, 48GiB or 24576MiB")
    return int(float(match.group(1)) * GPU_UNITS[match.group(2).lower()])


def deepspeed_from_accelerate_config(path: str | Path) -> tuple[int, DeepSpeedSetup | None]:
    """(processes, DeepSpeed settings or None) of an accelerate config YAML (``accelerate launch --config_file``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(
            f"{path}: cannot read the accelerate config ({exc}); pass an `accelerate config` YAML"
        ) from exc
    processes = int(data.get("num_processes", 1) or 1)
    if data.get("distributed_type") != "DEEPSPEED":
        return processes, None
    ds = data.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file"):
        return processes, _from_deepspeed_json(path.parent / ds["deepspeed_config_file"])
    return processes, DeepSpeedSetup(
        stage=int(ds.get("zero_stage", 2)),
        offload_optimizer=ds.get("offload_optimizer_device", "none") == "cpu",
        offload_params=ds.get("offload_param_device", "none") == "cpu",
    )


def _from_deepspeed_json(path: Path) -> DeepSpeedSetup:
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the DeepSpeed config ({exc}); fix deepspeed_config_file") from exc
    return DeepSpeedSetup(
        stage=int(zero.get("stage", 0)),
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") == "cpu",
        offload_params=zero.get("offload_param", {}).get("device", "none") == "cpu",
    )


def deepspeed_from_env(environ: Mapping[str, str]) -> DeepSpeedSetup | None:
    """The DeepSpeed settings `accelerate launch` passes to its processes, or None without DeepSpeed."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return _from_deepspeed_json(Path(environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
    return DeepSpeedSetup(
        stage=int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)),
        offload_optimizer=environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu",
        offload_params=environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu",
    )


def dataset_stats(cfg: FinetuneConfig) -> DatasetStats:
    """Samples per bucket of the configured dataset, scanned, checked (each image decoded once) and bucketed as
    the trainer does. The builtin demo dataset is read from RUN/builtin/demo once a run has drawn it; InputError
    before, or for a missing or empty dataset."""
    from finetune.data import build_dataset

    roots = []
    for root in cfg.data.roots:
        if builtin_name(root) is None:
            roots.append(root)
            continue
        drawn = Path(cfg.run_dir) / "builtin" / "demo"
        if not drawn.with_name("demo.complete").exists():
            raise InputError(f"{root}: the builtin demo dataset is drawn by the first run; steps are counted after")
        roots.append(drawn)
    dataset = build_dataset(replace(cfg.data, roots=tuple(roots)), cfg.caption, (None, None), seed=cfg.train.seed)
    groups = dataset.bucket_groups()
    return DatasetStats(len(dataset.samples), tuple((bucket, len(ix)) for bucket, ix in groups.items()))


def plan_text(
    cfg: FinetuneConfig,
    *,
    gpu_memory: str | None = None,
    gpus: int | None = None,
    accelerate_config: Path | None = None,
) -> str:
    """The printed plan of ``python -m finetune --plan``: memory on the named GPU (default: this machine's CUDA
    device, else an 80 GB one), launched per ``accelerate_config``; steps when the dataset can be read."""
    processes, deepspeed = deepspeed_from_accelerate_config(accelerate_config) if accelerate_config else (1, None)
    notes = []
    capacity = parse_gib(gpu_memory) if gpu_memory else _cuda_memory()
    name = _cuda_name() if not gpu_memory else None
    if capacity is None:
        capacity = parse_gib(DEFAULT_GPU)
        notes.append(f"no --gpu-memory and no CUDA device here: planned for {DEFAULT_GPU}")
    try:
        stats = dataset_stats(cfg)
    except XlbakeError as exc:
        stats = None
        notes.append(f"steps not counted: {exc}")
    result = plan(
        cfg, gpu_memory_bytes=capacity, gpus=gpus or processes, dataset_stats=stats, deepspeed=deepspeed, gpu_name=name
    )
    return format_plan(replace(result, notes=(*result.notes, *notes)))


def _cuda_memory() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def ema_check(cfg: FinetuneConfig, gpus: int = 1) -> str | None:
    """The EMA reach warning (``finetune.ema_reach``) for the steps the run will take: counted from the dataset as
    the planner does, else train.max_steps (an upper bound: the EMA moves even less in a shorter run); None if it
    moves enough, EMA is off or the steps cannot be known."""
    from finetune.ema_reach import ema_warning
    from finetune.planner.memory import steps_for

    if not cfg.ema.enabled:
        return None
    try:
        steps = steps_for(cfg, dataset_stats(cfg), gpus).total_steps
    except XlbakeError:
        steps = cfg.train.max_steps
    return ema_warning(cfg.ema, steps)


def check_before_training(
    cfg: FinetuneConfig, *, gpu_memory: str | None = None, force: bool = False, echo: Callable[[str], None] = print
) -> Plan | None:
    """At the start of training: plan the running launch (the CUDA device's size unless ``gpu_memory``, WORLD_SIZE
    processes, accelerate's DeepSpeed variables), ``echo`` the table from the first process and raise TrainingError
    if the plan does not fit (unless ``force``). Without CUDA and ``gpu_memory`` nothing is planned: None."""
    capacity = parse_gib(gpu_memory) if gpu_memory else _cuda_memory()
    if capacity is None:
        return None
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    result = plan(cfg, gpu_memory_bytes=capacity, gpus=gpus, deepspeed=deepspeed_from_env(os.environ))
    if os.environ.get("LOCAL_RANK", "0") == "0":  # every process plans (and refuses); one prints
        echo(format_plan(result))
    if result.verdict == "does not fit" and not force:
        raise TrainingError(
            f"the plan needs {_gib(result.gpu_total)} per GPU, more than the {_gib(capacity)} GPU; apply the changes "
            "listed above, or pass --force to try anyway"
        )
    return result


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _row(label: str, gpu: str, host: str, note: str = "") -> str:
    return f"  {label:<{LABEL_WIDTH}}{gpu:>{NUMBER_WIDTH}}{host:>{NUMBER_WIDTH}}  {note}".rstrip()


def format_plan(p: Plan) -> str:
    """The plan as a table: memory lines by phase, totals and verdict, steps, suggestions, notes."""
    launch = "plain" if p.gpus == 1 else "DDP"
    if p.deepspeed is not None:
        offload = " + optimizer offload" if p.deepspeed.offload_optimizer else ""
        launch = f"DeepSpeed ZeRO-{p.deepspeed.stage}{offload}"
    out = [
        f"Memory plan: {p.architecture}; trains {' + '.join(p.trained)}; {p.gpus} x {_gib(p.gpu_memory)} GPU, {launch}",
        _row("", "per GPU", "host RAM"),
    ]
    titles = {
        "resident": "allocated throughout",
        "forward": "forward/backward (the larger of this and the optimizer step counts)",
        "step": "optimizer step",
        "load": "host RAM at start",
    }
    for phase, title in titles.items():
        out.append(f"  [{title}]")
        for line in (x for x in p.lines if x.phase == phase):
            out.append(
                _row(line.label, _gib(line.gpu) if line.gpu else "-", _gib(line.host) if line.host else "-", line.note)
            )
    share = p.gpu_total / p.gpu_memory
    out.append(_row("peak per GPU", _gib(p.gpu_total), "", f"{share:.0%} of the GPU: {p.verdict.upper()}"))
    out.append(_row("peak host RAM (all processes)", "", _gib(p.host_total)))
    if p.steps is not None:
        s = p.steps
        out.append(
            f"Steps: {s.samples_per_epoch} samples/epoch (with repeats) in {s.batches_per_epoch} batches -> "
            f"{s.steps_per_epoch} optimizer steps/epoch, {s.total_steps} in total"
        )
        out.append(_time_line(s.gpu, s.step_seconds, s.total_steps))
    elif p.step_time is not None:
        out.append(_time_line(p.step_time.gpu, p.step_time.seconds, None))
    if p.suggestions:
        out.append("Does not fit comfortably. Changes, cheapest in quality first (each on top of those above):")
        for i, s in enumerate(p.suggestions, 1):
            out.append(f"  {i}. {s.change}")
            out.append(f"     -> {_gib(s.gpu_total)} per GPU ({s.verdict}), host {_gib(s.host_total)}; cost: {s.cost}")
    out += [f"Note: {note}" for note in p.notes]
    out += [f"Warning: {warning}" for warning in p.warnings]
    out.append("Activations are an estimate (shape-only forward, see finetune/plan_model.py); the rest is counted.")
    return "\n".join(out)


def _time_line(gpu: str | None, seconds: float | None, steps: int | None) -> str:
    """The time estimate, saying where its figure comes from."""
    if gpu is None or seconds is None:
        known = ", ".join(f"{k} {v:g}" for k, v in SDXL_IMAGES_PER_SECOND.items())
        return f"Time: no throughput figure for this GPU (assumed images/s of 1024^2 SDXL per GPU: {known})"
    source = f"assumed {SDXL_IMAGES_PER_SECOND[gpu]:g} images/s of 1024^2 SDXL per {gpu}, see finetune/plan_time.py"
    if steps is None:
        return f"Time: ~{seconds:.1f} s per optimizer step at 1024^2 ({source}); steps not counted"
    return f"Time: about {steps * seconds / 3600:.1f} h ({seconds:.2f} s per optimizer step; {source})"


ZERO2_LAUNCH = "accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml"


@dataclass(frozen=True)
class Change:
    """A change to try when a plan does not fit: config overrides (``sets``) or a DeepSpeed launch."""

    cost: str
    when: Callable[[FinetuneConfig, DeepSpeedSetup | None, int], bool]
    sets: Callable[[FinetuneConfig], dict[str, Any]] = lambda cfg: {}
    launch: DeepSpeedSetup | None = None

    def describe(self, cfg: FinetuneConfig) -> str:
        if self.launch is not None:
            return ZERO2_LAUNCH + ("" if self.launch.offload_optimizer else " --offload_optimizer_device none")
        return " ".join(f"--set {key}={_yaml(value)}" for key, value in self.sets(cfg).items())

    def apply(self, cfg: FinetuneConfig, ds: DeepSpeedSetup | None) -> tuple[FinetuneConfig, DeepSpeedSetup | None]:
        for key, value in self.sets(cfg).items():
            cfg = _with(cfg, key.split("."), value)
        return cfg, self.launch or ds


def _yaml(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _with(node: Any, keys: Sequence[str], value: Any) -> Any:
    """``node`` (frozen dataclasses and dicts) with the value at the dotted path ``keys`` replaced."""
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(node, Mapping):
        return {**node, head: _with(node.get(head), rest, value)}
    return replace(node, **{head: _with(getattr(node, head), rest, value)})


def _trains(cfg: FinetuneConfig, part: str) -> bool:
    lr = cfg.optim.te1_lr if part == "te1" else cfg.optim.te2_lr
    return lr > 0 and cfg.optim.unet_lr > 0  # freezing a text encoder is offered while the UNet trains


CHANGES: tuple[Change, ...] = (
    Change(
        "none: fused CUDA AdamW needs no group-size step temporaries",
        lambda c, d, n: c.optim.name == "adamw" and d is None and not c.optim.args.get("fused"),
        lambda c: {"optim.args.fused": True},
    ),
    Change(
        "none in quality; EMA updates cross PCIe every step (slower)",
        lambda c, d, n: c.ema.enabled and c.ema.device == "same",
        lambda c: {"ema.device": "cpu"},
    ),
    Change(
        "none: the same effective batch, more micro-steps",
        lambda c, d, n: c.train.batch_size > 1,
        lambda c: {"train.batch_size": 1, "train.grad_accum": c.train.batch_size * c.train.grad_accum},
    ),
    Change(
        "none in quality; ~30 % slower steps (the forward is recomputed)",
        lambda c, d, n: not c.model.gradient_checkpointing,
        lambda c: {"model.gradient_checkpointing": True},
    ),
    Change(
        "none in quality; needs deepspeed; states and gradients split over the GPUs",
        lambda c, d, n: n > 1 and d is None,
        launch=DeepSpeedSetup(stage=2),
    ),
    Change(
        "none in quality; optimizer steps on the CPU (much slower), ~16 bytes/param of host RAM",
        lambda c, d, n: d is None or (d.stage <= 2 and not d.offload_optimizer),
        launch=DeepSpeedSetup(stage=2, offload_optimizer=True),
    ),
    Change(
        "small: 8-bit Adam states (bitsandbytes: pip install xlbake[optim])",
        lambda c, d, n: c.optim.name == "adamw",
        lambda c: {"optim.name": "adamw8bit", "optim.args": {}},
    ),
    Change(
        "text encoder 1 (CLIP ViT-L) stays as the base",
        lambda c, d, n: _trains(c, "te1"),
        lambda c: {"optim.te1_lr": 0},
    ),
    Change(
        "a different optimizer (factored second moments, no momentum): retune the learning rate",
        lambda c, d, n: c.optim.name in ("adamw", "adamw8bit", "prodigy", "came"),
        lambda c: {"optim.name": "adafactor", "optim.args": {}},
    ),
    Change(
        "text encoder 2 (OpenCLIP bigG) stays as the base: only the UNet learns",
        lambda c, d, n: _trains(c, "te2"),
        lambda c: {"optim.te2_lr": 0},
    ),
    Change(
        "large at low LR: bf16 weights round away updates under ~0.4 % of a weight (raise the LR)",
        lambda c, d, n: d is None and not c.precision.full_bf16,
        lambda c: {"precision.mixed": "bf16", "precision.full_bf16": True},
    ),
)
"""What to change when a plan does not fit, in order of quality cost (none first), then of speed cost."""


def suggest_changes(
    cfg: FinetuneConfig, gpu_memory: int, gpus: int, deepspeed: DeepSpeedSetup | None
) -> list[Suggestion]:
    """Greedy, cheapest first: apply the first of ``CHANGES`` that lowers the peak, then look again from the top
    (a change that did not help may help once another phase is the peak), until the plan fits."""
    _, parts, _ = model_parts(cfg.model)
    suggestions: list[Suggestion] = []
    best = totals(memory_lines(cfg, parts, gpus, deepspeed))
    remaining = list(CHANGES)
    while remaining and verdict_for(best[0], gpu_memory) != "fits":
        for change in remaining:
            if not change.when(cfg, deepspeed, gpus):
                continue
            changed_cfg, changed_ds = change.apply(cfg, deepspeed)
            total = totals(memory_lines(changed_cfg, parts, gpus, changed_ds))
            if total[0] < best[0]:
                verdict = verdict_for(total[0], gpu_memory)
                suggestions.append(Suggestion(change.describe(cfg), change.cost, total[0], total[1], verdict))
                cfg, deepspeed, best = changed_cfg, changed_ds, total
                remaining.remove(change)
                break
        else:
            break  # nothing left lowers the peak
    return suggestions
