"""The EMA copies of the trained parts (ema-pytorch): built before accelerate wraps the parts, updated once per
optimizer step, saved in the training state as ``{part}.{key}`` tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger

from finetune.config import EmaConfig, FinetuneConfig
from finetune.ema_reach import ema_warning
from finetune.model import SdxlModel
from finetune.outputs import output_kinds

logger = get_logger(__name__)

NO_WARMUP_INV_GAMMA = 1e-9
"""ema-pytorch's decay is 1 - (1 + n / inv_gamma) ** -power (capped at beta): a tiny inv_gamma gives beta at once."""


def make_ema(module: torch.nn.Module, cfg: EmaConfig, device: torch.device) -> Any:
    """An ema-pytorch EMA of ``module`` (built before accelerate wraps it), its copy kept on ``device``.

    Every schedule setting is explicit: ema-pytorch's defaults would copy instead of averaging for 100 updates.
    """
    from ema_pytorch import EMA

    ema = EMA(
        module,
        beta=cfg.beta,
        update_after_step=cfg.update_after_step,
        update_every=cfg.update_every,
        inv_gamma=cfg.inv_gamma if cfg.warmup else NO_WARMUP_INV_GAMMA,
        power=cfg.power,
        include_online_model=False,
        allow_different_devices=cfg.device == "cpu",
    )
    return ema.to(device)


def build_emas(
    model: SdxlModel, parts: Sequence[str], cfg: FinetuneConfig, total_steps: int, device: torch.device
) -> dict[str, Any]:
    """Part name -> its EMA, for the trained ``parts`` with ema.enabled (else none), kept on ``device`` unless
    ema.device is cpu; warns about an EMA the run leaves near its start, or one that no output holds."""
    if not cfg.ema.enabled:
        return {}
    if warning := ema_warning(cfg.ema, total_steps):
        logger.warning(warning, main_process_only=True)
    if "ema" not in output_kinds(cfg.checkpoint.weights, ema=True):
        logger.warning(
            "ema.enabled with checkpoint.weights: raw: the EMA costs memory and time but no output or sample "
            "holds it; set checkpoint.weights: auto (EMA in tuned*, raw beside) or ema, or ema.enabled: false"
        )
    ema_device = torch.device("cpu") if cfg.ema.device == "cpu" else device
    return {name: make_ema(model.part(name), cfg.ema, ema_device) for name in parts}


def ema_tensors(emas: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every EMA's state as one flat dict, ``{part}.{key}``, for the training state."""
    return {f"{name}.{key}": value for name, ema in emas.items() for key, value in ema.state_dict().items()}


def load_ema_tensors(emas: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore every EMA from ``ema_tensors``' flat dict."""
    for name, ema in emas.items():
        ema.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")})
