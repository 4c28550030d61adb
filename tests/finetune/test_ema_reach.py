"""The EMA reach warning: what share of its starting weights an EMA keeps after a run, as ema-pytorch computes it."""

import pytest
import torch

from finetune.config import EmaConfig
from finetune.ema_reach import ema_reach, ema_warning
from finetune.emas import make_ema


def test_the_guide_decay_barely_moves_in_short_runs():
    cfg = EmaConfig(enabled=True, beta=0.9995)
    assert ema_reach(cfg, 114).start_share == pytest.approx(0.9995**113)  # ~95 % base (the first update copies)
    assert ema_reach(cfg, 2500).start_share == pytest.approx(0.9995**2499)  # ~29 %
    assert ema_reach(cfg, 114).averaging_steps == pytest.approx(2000)
    warning = ema_warning(cfg, 114)
    assert warning is not None and "~2,000 optimizer steps" in warning and "114" in warning and "95%" in warning
    assert "29%" in ema_warning(cfg, 2500)
    assert ema_warning(cfg, 10_000) is None  # 0.9995^9999 ~ 0.7 %
    assert ema_warning(EmaConfig(enabled=False), 114) is None
    assert ema_warning(EmaConfig(enabled=True, beta=0.9), 50) is None  # the tiny demo's EMA moves


@pytest.mark.parametrize(
    "cfg",
    [
        EmaConfig(enabled=True, beta=0.9),
        EmaConfig(enabled=True, beta=0.8, update_every=3),
        EmaConfig(enabled=True, beta=0.9, update_after_step=5, update_every=2),
        EmaConfig(enabled=True, beta=0.95, warmup=True, inv_gamma=2.0, power=0.75),
    ],
)
def test_the_share_is_what_ema_pytorch_leaves(cfg):
    """Weights 1 after the first optimizer step (and at the last copy), 0 on every later step: the EMA is the share."""
    steps = 30
    expected = ema_reach(cfg, steps)
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, cfg, torch.device("cpu"))
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(1.0 if step <= expected.start_step else 0.0)
        ema.update()
    assert ema.ema_model.weight.item() == pytest.approx(expected.start_share, rel=1e-5)
    assert 0 < expected.start_share < 1
