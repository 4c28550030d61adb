"""The EMA copies: ema-pytorch built with every schedule setting explicit."""

from dataclasses import replace

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.emas import make_ema
from xlbake.config import load_config


def test_ema_on_cpu_with_warmup():
    cfg = load_config(FinetuneConfig, None, ["ema.enabled=true", "ema.device=cpu", "ema.warmup=true"]).ema
    module = torch.nn.Linear(3, 3)
    ema = make_ema(module, cfg, torch.device("cpu"))
    decays = []
    for _ in range(4):
        with torch.no_grad():
            module.weight.add_(1.0)
        ema.update()
        decays.append(ema.get_current_decay())
    assert decays == sorted(decays) and 0 < decays[-1] < cfg.beta  # warming up towards beta
    assert not torch.equal(ema.ema_model.weight, module.weight)
    constant = make_ema(module, replace(cfg, warmup=False), torch.device("cpu"))
    constant.update(), constant.update(), constant.update()
    assert constant.get_current_decay() == pytest.approx(cfg.beta)
