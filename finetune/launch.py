"""The DeepSpeed settings of a launch, apart from the training settings (as accelerate keeps them): one model,
``ZeroSettings``, read from an accelerate config YAML (``configs/accelerate/``), a DeepSpeed JSON, the variables
``accelerate launch`` gives its processes or accelerate's ``DeepSpeedPlugin``; and the one rule saying which
finetune configs they cannot run (``zero_problems``), which the launch enforces and the planner reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.config import FinetuneConfig
from xlbake.errors import ConfigError, InputError

ZERO3 = 3
OFFLOAD_OPTIMIZERS = ("adamw",)
"""Optimizers accelerate turns into DeepSpeed's CPU optimizer with the same update rule (DeepSpeedCPUAdam in AdamW
mode); it would silently turn any other into CPU Adam."""
DEFAULT_STAGE = 2
"""accelerate's ZeRO stage when a launch names none."""


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO settings of a launch: what the planner counts and the finetune config must agree with."""

    stage: int = DEFAULT_STAGE  # ZeRO stage 0-3
    offload_optimizer: str = "none"  # "none" | "cpu" | "nvme"
    gradient_clipping: float | None = None  # None: "auto" (filled from optim.max_grad_norm)
    grad_accum: int | None = None  # None: "auto" (filled from train.grad_accum)
    micro_batch: int | None = None  # None: "auto" (filled from train.batch_size)
    offload_params: str = "none"  # "none" | "cpu" | "nvme" (ZeRO-3)

    @property
    def optimizer_on_cpu(self) -> bool:
        """fp32 master weights and optimizer states in host RAM, stepped by DeepSpeed's CPU Adam."""
        return self.offload_optimizer == "cpu"

    @property
    def params_on_cpu(self) -> bool:
        """ZeRO-3 keeps the weights' partitions in host RAM."""
        return self.offload_params == "cpu"


def settings_of_config(ds: Mapping[str, Any], default_stage: int = 0) -> ZeroSettings:
    """The settings of a DeepSpeed config (the JSON's structure; ``"auto"`` values are None)."""
    zero = ds.get("zero_optimization", {})
    return ZeroSettings(
        stage=int(zero.get("stage", default_stage)),
        offload_optimizer=str((zero.get("offload_optimizer") or {}).get("device", "none")),
        gradient_clipping=_number(ds.get("gradient_clipping"), float),
        grad_accum=_number(ds.get("gradient_accumulation_steps"), int),
        micro_batch=_number(ds.get("train_micro_batch_size_per_gpu"), int),
        offload_params=str((zero.get("offload_param") or {}).get("device", "none")),
    )


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """``value`` as ``kind``; None for a value DeepSpeed fills itself ("auto") or one not given."""
    return None if value in (None, "auto") else kind(float(value))


def zero_settings(plugin: Any) -> ZeroSettings:
    """The settings of an accelerate ``DeepSpeedPlugin`` (from launch flags, a YAML or a DeepSpeed JSON)."""
    return settings_of_config(plugin.deepspeed_config, plugin.zero_stage)


def launch_zero_settings() -> ZeroSettings | None:
    """The DeepSpeed settings ``accelerate launch`` passed to this process, or None without DeepSpeed."""
    if not env_flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    from accelerate.utils import DeepSpeedPlugin

    return zero_settings(DeepSpeedPlugin())


def env_flag(name: str) -> bool:
    """A true/false variable as accelerate reads them."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def read_deepspeed_json(path: Path) -> ZeroSettings:
    """The settings of a DeepSpeed JSON config file; InputError if it cannot be read."""
    try:
        return settings_of_config(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: cannot read the DeepSpeed config ({exc}); fix deepspeed_config_file") from exc


def read_accelerate_config(path: str | Path) -> tuple[int, ZeroSettings | None]:
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
        return processes, read_deepspeed_json(path.parent / ds["deepspeed_config_file"])
    return processes, ZeroSettings(
        stage=int(ds.get("zero_stage", DEFAULT_STAGE)),
        offload_optimizer=str(ds.get("offload_optimizer_device", "none")),
        gradient_clipping=_number(ds.get("gradient_clipping"), float),
        grad_accum=_number(ds.get("gradient_accumulation_steps"), int),
        offload_params=str(ds.get("offload_param_device", "none")),
    )


def zero_problems(cfg: FinetuneConfig, zero: ZeroSettings) -> list[str]:
    """Every setting of ``cfg`` that cannot run under the DeepSpeed settings ``zero``, one message each."""
    problems = []
    if zero.stage == ZERO3 and cfg.ema.enabled:
        problems.append(
            "ema.enabled: EMA cannot follow DeepSpeed ZeRO-3, which splits every weight over the processes "
            "(ema-pytorch would average empty slices); train EMA runs with plain DDP "
            "(configs/accelerate/multi-gpu.yaml) "
            "or set ema.enabled: false"
        )
    elif cfg.ema.enabled and cfg.precision.mixed != "no":
        problems.append(
            f"ema.enabled: under DeepSpeed with precision.mixed: {cfg.precision.mixed} the model holds only 16-bit "
            "copies of the weights (the fp32 masters are split over the processes) and EMA would average their "
            "rounding; train EMA runs with plain DDP (configs/accelerate/multi-gpu.yaml) or precision.mixed: no"
        )
    if zero.offload_optimizer != "none" and cfg.optim.name not in OFFLOAD_OPTIMIZERS:
        problems.append(
            f"optim.name: {cfg.optim.name} cannot run with DeepSpeed optimizer offload (accelerate would replace "
            "it with DeepSpeed's CPU Adam); use adamw, or offload_optimizer_device: none"
        )
    if zero.gradient_clipping is not None and zero.gradient_clipping != cfg.optim.max_grad_norm:
        problems.append(
            f"optim.max_grad_norm: {cfg.optim.max_grad_norm} but DeepSpeed clips at {zero.gradient_clipping} "
            "(it clips inside its own step); make gradient_clipping in the accelerate config equal, or auto"
        )
    if zero.grad_accum is not None and zero.grad_accum != cfg.train.grad_accum:
        problems.append(
            f"train.grad_accum: {cfg.train.grad_accum} but DeepSpeed accumulates {zero.grad_accum} batches; "
            "make gradient_accumulation_steps in the accelerate config equal, or auto"
        )
    if zero.micro_batch is not None and zero.micro_batch != cfg.train.batch_size:
        problems.append(
            f"train.batch_size: {cfg.train.batch_size} but DeepSpeed's train_micro_batch_size_per_gpu is "
            f"{zero.micro_batch}; make them equal, or auto"
        )
    return problems


def check_zero(cfg: FinetuneConfig, zero: ZeroSettings) -> None:
    """ConfigError listing every setting of ``cfg`` that cannot run under the DeepSpeed settings ``zero``."""
    if problems := zero_problems(cfg, zero):
        raise ConfigError("; ".join(problems))


def check_launch(cfg: FinetuneConfig) -> None:
    """Refuse, before anything is loaded or written, a config the DeepSpeed launch of this process cannot run."""
    zero = launch_zero_settings()
    if zero is not None:
        check_zero(cfg, zero)
