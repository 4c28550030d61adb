"""One real training step under mixed precision on the CPU (users run the fp16 default; the other trainer tests run
precision.mixed: no). Its own module: accelerate allows one mixed-precision setting per live AcceleratorState, and
test_trainer.py keeps a module-scoped trainer alive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_run import tiny_run_sections

from finetune.config import FinetuneConfig
from finetune.model import DTYPES
from finetune.trainer import Trainer
from xlbake.config import load_config


def make_config(tiny_paths, demo_dataset, run_dir: Path, *overrides: str) -> FinetuneConfig:
    """The shared tiny run, batch 2, every part training."""
    data = {**tiny_run_sections(tiny_paths, demo_dataset, run_dir), "train": {"seed": 3, "batch_size": 2}}
    data["optim"] = {"unet_lr": 1e-3, "te1_lr": 2e-4, "te2_lr": 2e-4}
    return load_config(FinetuneConfig, data=data, overrides=overrides)


def autocast_like_a_gpu(monkeypatch) -> None:
    """Make accelerate's fp16 on the CPU do what it does on a GPU: autocast to fp16 with a gradient scaler.

    On the CPU accelerate accepts precision.mixed: fp16 but sets up neither (no autocast, no scaler: the run is
    plain fp32), while torch's CPU autocast and GradScaler do support fp16. So the two attributes accelerate's
    GPU branch sets are set here, before the optimizer is prepared (it takes the scaler then).
    """
    original = Trainer._prepare

    def prepare(self, *args):
        self.accelerator.native_amp = True
        self.accelerator.scaler = torch.amp.GradScaler("cpu")
        original(self, *args)

    monkeypatch.setattr(Trainer, "_prepare", prepare)


@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_a_mixed_precision_step_autocasts_the_unet_and_keeps_fp32_weights(
    mixed, tiny_paths, demo_dataset, tmp_path, monkeypatch
):
    """Every trainer test above runs precision.mixed: no, while users run the fp16 default: one real step under
    bf16 and (stood in, see above) fp16, hooks recording the dtype each UNet Linear computes in."""
    overrides = ("train.max_steps=1", "train.grad_accum=1", "ema.enabled=false", "checkpoint.weights=raw")
    cfg = make_config(tiny_paths, demo_dataset, tmp_path, f"precision.mixed={mixed}", *overrides)
    if mixed == "fp16":
        autocast_like_a_gpu(monkeypatch)
    trainer = Trainer(cfg)
    trainer.setup()
    before = [p.detach().clone() for p in trainer.params]
    seen: set[torch.dtype] = set()
    linears = [m for m in trainer.model.unet.modules() if isinstance(m, torch.nn.Linear)]
    for linear in linears:
        linear.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert len(linears) > 20 and seen == {DTYPES[mixed]}  # every UNet Linear ran in the autocast dtype
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert all(p.dtype == torch.float32 for p in trainer.params)  # fp32 master weights
    assert sum(not torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True)) > 0.9 * len(before)
    if mixed == "fp16":  # the loss was scaled and the step not skipped (it would be on inf/nan gradients)
        assert trainer.accelerator.scaler.get_scale() > 1 and not trainer.optimizer.step_was_skipped
