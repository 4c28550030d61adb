"""What to change when a plan does not fit: config overrides and DeepSpeed launches in order of their cost, tried
greedily on the memory lines (``finetune.planner.memory``) until the plan fits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from finetune.config import FinetuneConfig
from finetune.launch import ZeroSettings, zero_problems
from finetune.planner.memory import Verdict, memory_lines, totals, verdict_for
from finetune.planner.parts import model_parts


@dataclass(frozen=True)
class Suggestion:
    """A config or launch change and the peak per GPU with it (and every suggestion above it)."""

    change: str
    cost: str
    gpu_total: int
    host_total: int
    verdict: Verdict


ZERO2_LAUNCH = "accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml"


@dataclass(frozen=True)
class Change:
    """A change to try when a plan does not fit: config overrides (``sets``) or a DeepSpeed launch."""

    cost: str
    when: Callable[[FinetuneConfig, ZeroSettings | None, int], bool]
    sets: Callable[[FinetuneConfig], dict[str, Any]] = lambda cfg: {}
    launch: ZeroSettings | None = None

    def describe(self, cfg: FinetuneConfig) -> str:
        if self.launch is not None:
            return ZERO2_LAUNCH + ("" if self.launch.optimizer_on_cpu else " --offload_optimizer_device none")
        return " ".join(f"--set {key}={_yaml(value)}" for key, value in self.sets(cfg).items())

    def apply(self, cfg: FinetuneConfig, ds: ZeroSettings | None) -> tuple[FinetuneConfig, ZeroSettings | None]:
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
    """Whether text encoder ``part`` trains beside the UNet (freezing it is offered only while the UNet trains)."""
    return cfg.optim.part_lrs[part] > 0 and cfg.optim.unet_lr > 0


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
        launch=ZeroSettings(stage=2),
    ),
    Change(
        "none in quality; optimizer steps on the CPU (much slower), ~16 bytes/param of host RAM",
        lambda c, d, n: d is None or (d.stage <= 2 and not d.optimizer_on_cpu),
        launch=ZeroSettings(stage=2, offload_optimizer="cpu"),
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
    cfg: FinetuneConfig, gpu_memory: int, gpus: int, deepspeed: ZeroSettings | None
) -> list[Suggestion]:
    """Greedy, cheapest first: apply the first of ``CHANGES`` that lowers the peak, then look again from the top
    (a change that did not help may help once another phase is the peak), until the plan fits. A change after
    which the DeepSpeed launch would refuse the config (``finetune.launch.zero_problems``) is never advised."""
    _, parts, _ = model_parts(cfg.model)
    suggestions: list[Suggestion] = []
    best = totals(memory_lines(cfg, parts, gpus, deepspeed))
    remaining = list(CHANGES)
    while remaining and verdict_for(best[0], gpu_memory) != "fits":
        for change in remaining:
            if not change.when(cfg, deepspeed, gpus):
                continue
            changed_cfg, changed_ds = change.apply(cfg, deepspeed)
            if _refused(changed_cfg, changed_ds) - _refused(cfg, deepspeed):
                continue
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


def _refused(cfg: FinetuneConfig, deepspeed: ZeroSettings | None) -> set[str]:
    return set(zero_problems(cfg, deepspeed)) if deepspeed is not None else set()
