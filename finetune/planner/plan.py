"""The plan of one config on one kind of GPU: its memory (``memory``), verdict, the changes that make it fit
(``advice``), its steps (``xlbake.data.steps``) and their assumed time (``speed``), and what the DeepSpeed launch
would refuse (``finetune.launch``). Printed by ``finetune.planner.report``.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import FinetuneConfig
from finetune.ema_reach import ema_warning
from finetune.launch import ZeroSettings, zero_problems
from finetune.planner.advice import Suggestion, suggest_changes
from finetune.planner.memory import Line, Verdict, memory_lines, totals, verdict_for
from finetune.planner.parts import Part, model_parts
from finetune.planner.speed import StepTime, gpu_kind, step_seconds
from xlbake.data.steps import Steps, count_steps


@dataclass(frozen=True)
class DatasetStats:
    """What the step count depends on: training samples per bucket (each image times its folder's repeats)."""

    images: int
    buckets: tuple[tuple[tuple[int, int], int], ...]  # ((width, height), samples)

    @property
    def samples(self) -> int:
        return sum(count for _, count in self.buckets)

    @property
    def mean_area(self) -> float:
        """The mean sample's pixels, in units of 1024^2 (what the assumed throughput is for)."""
        return sum(w * h * count for (w, h), count in self.buckets) / max(self.samples, 1) / 1024**2


@dataclass(frozen=True)
class Plan:
    """The memory and time plan of one config on one kind of GPU."""

    architecture: str
    parts: tuple[Part, ...]
    trained: tuple[str, ...]
    lines: tuple[Line, ...]
    gpu_total: int
    host_total: int
    gpu_memory: int
    gpus: int
    deepspeed: ZeroSettings | None
    verdict: Verdict
    steps: Steps | None  # None without a counted dataset
    step_time: StepTime  # of one optimizer step: at the dataset's mean size, else at 1024^2
    suggestions: tuple[Suggestion, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    def line(self, label_start: str) -> Line:
        """The line whose label starts with ``label_start``; a zero line if none (e.g. EMA when it is off)."""
        for line in self.lines:
            if line.label.startswith(label_start):
                return line
        return Line(label_start, 0)


def plan(
    cfg: FinetuneConfig,
    *,
    gpu_memory_bytes: int,
    gpus: int = 1,
    dataset_stats: DatasetStats | None = None,
    deepspeed: ZeroSettings | None = None,
    suggest: bool = True,
    gpu_name: str | None = None,
) -> Plan:
    """Plan ``cfg`` on ``gpus`` GPUs of ``gpu_memory_bytes`` each (``gpu_name``: their CUDA name, if known), launched
    plainly (DDP if gpus > 1) or with ``deepspeed``; with ``dataset_stats``, also the step count and time (assumed
    throughput, ``SDXL_IMAGES_PER_SECOND``). ``suggest``: list changes when it does not fit."""
    arch, parts, notes = model_parts(cfg.model)
    lines = memory_lines(cfg, parts, gpus, deepspeed)
    gpu_total, host_total = totals(lines)
    verdict = verdict_for(gpu_total, gpu_memory_bytes)
    suggestions: tuple[Suggestion, ...] = ()
    if suggest and verdict != "fits":
        suggestions = tuple(suggest_changes(cfg, gpu_memory_bytes, gpus, deepspeed))
    if deepspeed is not None:
        notes = (*notes, *(f"the DeepSpeed launch refuses this config: {p}" for p in zero_problems(cfg, deepspeed)))
    trained = tuple(name for name, lr in cfg.optim.part_lrs.items() if lr > 0)
    kind = gpu_kind(gpu_name, gpu_memory_bytes)
    steps = run_steps(cfg, dataset_stats, gpus) if dataset_stats is not None else None
    area = dataset_stats.mean_area if dataset_stats is not None else 1.0
    warning = ema_warning(cfg.ema, steps.total_steps) if steps is not None else None
    return Plan(
        arch,
        parts,
        trained,
        tuple(lines),
        gpu_total,
        host_total,
        gpu_memory_bytes,
        gpus,
        deepspeed,
        verdict,
        steps,
        StepTime(kind, step_seconds(cfg, kind, area)),
        suggestions,
        tuple(notes),
        (warning,) if warning else (),
    )


def run_steps(cfg: FinetuneConfig, stats: DatasetStats, gpus: int) -> Steps:
    """The optimizer steps the trainer's sampler makes of the dataset on ``gpus`` processes."""
    train = cfg.train
    return count_steps(
        (count for _, count in stats.buckets),
        batch=train.batch_size,
        grad_accum=train.grad_accum,
        processes=gpus,
        epochs=train.epochs,
        max_steps=train.max_steps,
    )
