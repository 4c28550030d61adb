"""The plan (``finetune.planner.plan``) as a printable table, and what the CLI needs around it: GPU sizes, the
launch's settings, the dataset's counts.

    python -m finetune --config C --plan [--gpu-memory 80GB] [--gpus N] [--accelerate-config A]

``plan_text`` prints a plan for a GPU named on the command line; ``check_before_training`` plans the running
launch (the CUDA device's size, WORLD_SIZE, accelerate's DeepSpeed variables) and refuses one that cannot fit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from finetune.config import FinetuneConfig, builtin_name
from finetune.launch import launch_zero_settings, read_accelerate_config
from finetune.planner.plan import DatasetStats, Plan, plan, run_steps
from finetune.planner.speed import GIB, SDXL_IMAGES_PER_SECOND
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
    processes, deepspeed = read_accelerate_config(accelerate_config) if accelerate_config else (1, None)
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

    if not cfg.ema.enabled:
        return None
    try:
        steps = run_steps(cfg, dataset_stats(cfg), gpus).total_steps
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
    result = plan(cfg, gpu_memory_bytes=capacity, gpus=gpus, deepspeed=launch_zero_settings())
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
        offload = " + optimizer offload" if p.deepspeed.optimizer_on_cpu else ""
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
    out.append(_time_line(p.step_time.gpu, p.step_time.seconds, p.steps.total_steps if p.steps else None))
    if p.suggestions:
        out.append("Does not fit comfortably. Changes, cheapest in quality first (each on top of those above):")
        for i, s in enumerate(p.suggestions, 1):
            out.append(f"  {i}. {s.change}")
            out.append(f"     -> {_gib(s.gpu_total)} per GPU ({s.verdict}), host {_gib(s.host_total)}; cost: {s.cost}")
    out += [f"Note: {note}" for note in p.notes]
    out += [f"Warning: {warning}" for warning in p.warnings]
    out.append("Activations are an estimate (shape-only forward, finetune/planner/measure.py); the rest is counted.")
    return "\n".join(out)


def _time_line(gpu: str | None, seconds: float | None, steps: int | None) -> str:
    """The time estimate, saying where its figure comes from."""
    if gpu is None or seconds is None:
        known = ", ".join(f"{k} {v:g}" for k, v in SDXL_IMAGES_PER_SECOND.items())
        return f"Time: no throughput figure for this GPU (assumed images/s of 1024^2 SDXL per GPU: {known})"
    source = f"assumed {SDXL_IMAGES_PER_SECOND[gpu]:g} images/s of 1024^2 SDXL per {gpu}, see finetune/planner/speed.py"
    if steps is None:
        return f"Time: ~{seconds:.1f} s per optimizer step at 1024^2 ({source}); steps not counted"
    return f"Time: about {steps * seconds / 3600:.1f} h ({seconds:.2f} s per optimizer step; {source})"
