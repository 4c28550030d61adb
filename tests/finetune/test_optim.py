"""Allow-listed optimizers, per-part learning rates, clear messages for missing packages, LR schedules."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from finetune.config import OptimConfig
from finetune.optim import (
    EXTRAS_HINT,
    OPTIMIZERS,
    SINGLE_LR,
    ParamGroup,
    build_optimizer,
    build_scheduler,
    current_lrs,
    follow_schedule,
    warmup_steps,
)
from xlbake.errors import ConfigError


def groups(unet_lr: float = 1e-3, te_lr: float = 1e-4) -> list[ParamGroup]:
    torch.manual_seed(0)
    unet, te = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    return [ParamGroup("unet", list(unet.parameters()), unet_lr), ParamGroup("te1", list(te.parameters()), te_lr)]


def installed(name: str) -> bool:
    try:
        importlib.import_module(OPTIMIZERS[name].module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_builds_and_steps(name):
    if not installed(name):
        pytest.skip(f"{OPTIMIZERS[name].package} not installed (optional extra)")
    if name in ("adamw8bit", "lion8bit") and not torch.cuda.is_available():
        pytest.skip("bitsandbytes 8-bit optimizers need a GPU")
    lrs = (1.0, 1.0) if name in SINGLE_LR else (1e-2, 1e-3)
    parts = groups(*lrs)
    optimizer = build_optimizer(parts, OptimConfig(name=name))
    before = [p.detach().clone() for g in parts for p in g.params]
    loss = sum((p**2).sum() for g in parts for p in g.params)
    loss.backward()
    optimizer.step()
    assert current_lrs(optimizer) == {"unet": lrs[0], "te1": lrs[1]}
    after = [p.detach() for g in parts for p in g.params]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_adamw_settings_reach_the_optimizer():
    cfg = OptimConfig(weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6, args={"amsgrad": True})
    optimizer = build_optimizer(groups(), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"], group["amsgrad"]) == (0.05, (0.8, 0.95), 1e-6, True)
    assert group["foreach"] is True


def test_adafactor_follows_our_learning_rate():
    optimizer = build_optimizer(groups(unet_lr=3e-4), OptimConfig(name="adafactor", te1_lr=0))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"]) == (3e-4, False, False)


def test_zero_lr_part_is_left_out():
    optimizer = build_optimizer(groups(te_lr=0), OptimConfig())
    assert [g["name"] for g in optimizer.param_groups] == ["unet"]


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import of it raises ImportError
    with pytest.raises(ConfigError, match=r"lion-pytorch.*pip install xlbake\[optim\]") as info:
        build_optimizer(groups(), OptimConfig(name="lion"))
    assert EXTRAS_HINT in str(info.value)


def test_prodigy_needs_one_learning_rate():
    with pytest.raises(ConfigError, match="same LR"):
        build_optimizer(groups(1.0, 0.5), OptimConfig(name="prodigy"))


def test_unknown_optimizer_argument_refused():
    with pytest.raises(ConfigError, match="does not accept momentum"):
        build_optimizer(groups(), OptimConfig(args={"momentum": 0.9}))


def test_bad_optimizer_value_refused():
    with pytest.raises(ConfigError, match="cannot build adamw"):
        build_optimizer(groups(), OptimConfig(betas=(1.5, 0.9)))


def test_warmup_by_steps_or_ratio():
    assert warmup_steps(OptimConfig(scheduler="constant_with_warmup", warmup_steps=7), 100) == 7
    assert warmup_steps(OptimConfig(scheduler="constant_with_warmup", warmup_ratio=0.05), 101) == 6


def lr_curve(cfg: OptimConfig, total: int) -> list[float]:
    optimizer = build_optimizer(groups(unet_lr=1.0, te_lr=0), cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    curve = []
    for _ in range(total):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def test_schedules():
    assert lr_curve(OptimConfig(unet_lr=1.0), 5) == [1.0] * 5
    warm = lr_curve(OptimConfig(unet_lr=1.0, scheduler="constant_with_warmup", warmup_steps=4), 6)
    assert warm == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    linear = lr_curve(OptimConfig(unet_lr=1.0, scheduler="linear"), 4)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25])
    cosine = lr_curve(OptimConfig(unet_lr=1.0, scheduler="cosine"), 4)
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine == sorted(cosine, reverse=True)
    restarts = lr_curve(OptimConfig(unet_lr=1.0, scheduler="cosine_with_restarts", cycles=2), 8)
    assert restarts[4] == pytest.approx(1.0) and restarts[3] < 0.5
    poly = lr_curve(OptimConfig(unet_lr=1.0, scheduler="polynomial", power=2.0), 4)
    assert poly[1] == pytest.approx((1 - 1 / 4) ** 2 * (1.0 - 1e-7) + 1e-7)


def test_a_resumed_longer_schedule_sets_the_next_steps_lr():
    """A linear decay saved at step 2 of 4 (LR 0.5), loaded into a schedule of 8 steps: the next step uses 0.75."""
    cfg = OptimConfig(unet_lr=1.0, te1_lr=0, scheduler="linear")
    optimizer = build_optimizer(groups(unet_lr=1.0, te_lr=0), cfg)
    scheduler = build_scheduler(optimizer, cfg, 4)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    saved = (optimizer.state_dict(), scheduler.state_dict())
    optimizer = build_optimizer(groups(unet_lr=1.0, te_lr=0), cfg)
    longer = build_scheduler(optimizer, cfg, 8)
    optimizer.load_state_dict(saved[0])
    longer.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    follow_schedule(longer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.75)
    optimizer.step()
    longer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5 / 8)
