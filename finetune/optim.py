"""Optimizers from an explicit allow-list of names, and LR schedules with warmup.

Configs cannot import arbitrary classes: ``OPTIMIZERS`` maps each allowed name to the module and class it builds.
Optional packages are imported only when chosen, with a clear message when missing.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from finetune.config import OptimConfig
from xlbake.errors import ConfigError

EXTRAS_HINT = "pip install xlbake[optim]"


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an allowed optimizer lives and which of the common settings it takes."""

    module: str
    attr: str
    package: str  # pip package to suggest when the import fails
    betas: bool = True
    eps: bool = True
    defaults: tuple[tuple[str, object], ...] = ()  # kwargs that make it behave as a plain LR-driven optimizer


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW", "torch"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "lion8bit": OptimizerSpec("bitsandbytes.optim", "Lion8bit", "bitsandbytes", eps=False),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch", eps=False),
    # Adafactor's own relative-step schedule would ignore our LR; turn it off so the config's LR and schedule rule.
    "adafactor": OptimizerSpec(
        "transformers.optimization",
        "Adafactor",
        "transformers",
        betas=False,
        eps=False,
        defaults=(("scale_parameter", False), ("relative_step", False), ("warmup_init", False)),
    ),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt"),
    "came": OptimizerSpec("came_pytorch", "CAME", "came-pytorch", betas=False, eps=False),
}


SINGLE_LR = ("prodigy",)
"""Optimizers that refuse different learning rates per param group."""


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters of one model part with their learning rate."""

    name: str  # "unet" | "te1" | "te2"
    params: Sequence[torch.nn.Parameter]
    lr: float


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Import the allow-listed optimizer ``name``; ConfigError for an unknown name or a missing package."""
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ConfigError(f"optim.name: {name!r} is not one of {', '.join(OPTIMIZERS)}")
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ConfigError(
            f"optim.name: {name} needs the package {spec.package} ({exc}); install it with `{EXTRAS_HINT}`"
        ) from exc
    return getattr(module, spec.attr)


def optimizer_kwargs(cfg: OptimConfig, cls: type) -> dict[str, object]:
    """Keyword arguments for ``cls`` from the config: common settings it accepts, its defaults, then ``cfg.args``."""
    spec = OPTIMIZERS[cfg.name]
    kwargs: dict[str, object] = {"weight_decay": cfg.weight_decay, **dict(spec.defaults)}
    if spec.betas:
        kwargs["betas"] = tuple(cfg.betas)
    if spec.eps:
        kwargs["eps"] = cfg.eps
    if cfg.name == "adamw" and "fused" not in cfg.args and "foreach" not in cfg.args:
        kwargs["foreach"] = True  # fused is faster on CUDA but must be asked for: it needs every param on CUDA
    kwargs.update(cfg.args)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(f"optim.args: {cfg.name} does not accept {', '.join(unknown)}")
    return kwargs


def build_optimizer(groups: Sequence[ParamGroup], cfg: OptimConfig) -> torch.optim.Optimizer:
    """One optimizer over every part with a non-zero learning rate, one param group per part (named in the group)."""
    cls = optimizer_class(cfg.name)
    kwargs = optimizer_kwargs(cfg, cls)
    param_groups = [{"params": list(g.params), "lr": g.lr, "name": g.name} for g in groups if g.lr > 0 and g.params]
    if not param_groups:
        raise ConfigError("optim: no trainable parameters (every part frozen or its learning rate is 0)")
    if cfg.name in SINGLE_LR and len({g["lr"] for g in param_groups}) > 1:
        raise ConfigError(
            f"optim.name: {cfg.name} adapts one step size for all parts; give the trained parts the same LR "
            "(optim.unet_lr/te1_lr/te2_lr, 1.0 is usual) or freeze some with 0"
        )
    first_lr = param_groups[0]["lr"]
    try:
        return cls(param_groups, lr=first_lr, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"optim: cannot build {cfg.name} with {sorted(kwargs)} ({exc}); check optim.args") from exc


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps: ``warmup_steps``, or ``warmup_ratio`` of ``total_steps`` rounded up."""
    if cfg.warmup_ratio:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return cfg.warmup_steps


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, num_processes: int = 1
) -> LRScheduler:
    """The diffusers schedule ``cfg.scheduler`` over ``total_steps`` optimizer steps.

    accelerate steps a prepared scheduler once per process for every optimizer step, so step counts are
    multiplied by ``num_processes`` (as in the diffusers training examples).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
        num_cycles=cfg.cycles,
        power=cfg.power,
    )


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each named param group, e.g. {"unet": 1e-6, "te1": 1e-6}."""
    return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def follow_schedule(scheduler: LambdaLR) -> None:
    """Set each param group's LR to ``scheduler``'s value at its current step: after loading a state saved with a
    schedule of another length (train.max_steps raised), the next step uses the new schedule's LR, not the old."""
    for group, base_lr, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
