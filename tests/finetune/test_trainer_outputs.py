"""What the finetune outputs hold: frozen parts exactly as the base at any precision, EMA weights when EMA is on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_run_sections

from extract.config import ExtractConfig
from extract.pipeline import run_extract
from finetune import outputs
from finetune.config import FinetuneConfig
from finetune.trainer import Trainer
from xlbake.config import load_config

TE2_PREFIX = "conditioner.embedders.1."
TE2_DIFFUSERS = Path("text_encoder_2") / "model.safetensors"


def tiny_config(tiny_paths, demo_dataset, run_dir: Path, *overrides: str) -> FinetuneConfig:
    """Two optimizer steps of batch 2, a checkpoint after the first, no samples, no logs."""
    data = {
        **tiny_run_sections(tiny_paths, demo_dataset, run_dir),
        "train": {"seed": 1, "epochs": 1, "max_steps": 2, "batch_size": 2},
        "optim": {"unet_lr": 1e-3, "te1_lr": 1e-3, "te2_lr": 1e-3},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    return load_config(FinetuneConfig, data=data, overrides=overrides)


def train(cfg: FinetuneConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def frozen_te2_run(request, tiny_paths, demo_dataset, tmp_path_factory):
    """A run with TE2 frozen (te2_lr 0) under 16-bit mixed precision, EMA on, every kind of output written."""
    mixed = request.param
    cfg = tiny_config(
        tiny_paths,
        demo_dataset,
        tmp_path_factory.mktemp(f"frozen-{mixed}"),
        f"precision.mixed={mixed}",
        "optim.te2_lr=0",
        "ema.enabled=true",
        "checkpoint.weights=both",
        "checkpoint.every_steps=1",
        "checkpoint.diffusers=true",
    )
    train(cfg)
    return cfg


def test_frozen_part_is_saved_bit_identical_to_the_base(frozen_te2_run, tiny_paths):
    run = frozen_te2_run.run_dir
    base = load_file(str(tiny_paths.single_file))
    te2 = [k for k in base if k.startswith(TE2_PREFIX)]
    assert te2
    for name in ("tuned.fp32.safetensors", "tuned-raw.fp32.safetensors"):
        tuned = load_file(str(run / name))
        assert all(torch.equal(tuned[k], base[k]) for k in te2), name
    for name in ("tuned.safetensors", "tuned-raw.safetensors", "checkpoints/step-00000001.safetensors"):
        tuned = load_file(str(run / name))  # fp16: the base rounded once, not twice through the mixed dtype
        assert all(torch.equal(tuned[k], base[k].to(torch.float16)) for k in te2), name
    folder = load_file(str(run / "tuned-diffusers" / TE2_DIFFUSERS))
    reference = load_file(str(tiny_paths.diffusers_dir / TE2_DIFFUSERS))
    assert folder.keys() == reference.keys()
    assert all(torch.equal(folder[k], reference[k]) for k in reference)


def test_extract_finds_a_frozen_part_unchanged(frozen_te2_run, tiny_paths, tmp_path):
    lines: list[str] = []
    cfg = load_config(
        ExtractConfig,
        data={
            "base": str(tiny_paths.single_file),
            "tuned": str(frozen_te2_run.run_dir / "tuned.fp32.safetensors"),
            "out": str(tmp_path / "lora.safetensors"),
            "dim": [4],
        },
    )
    result = run_extract(cfg, echo=lines.append)
    assert any(line.startswith("te2: skipped: unchanged") for line in lines), lines
    lora = load_file(str(result.outputs[0]))
    assert lora and not any(key.startswith("lora_te2_") for key in lora)


def test_default_outputs_follow_ema():
    def kinds(*overrides: str) -> tuple[str, ...]:
        cfg = load_config(FinetuneConfig, None, overrides)
        return outputs.output_kinds(cfg.checkpoint.weights, cfg.ema.enabled)

    assert kinds() == ("raw",)
    assert kinds("ema.enabled=true") == ("ema", "raw")  # EMA in tuned*, the raw weights beside it
    assert kinds("ema.enabled=true", "checkpoint.weights=ema") == ("ema",)
    assert kinds("ema.enabled=true", "checkpoint.weights=raw") == ("raw",)


def test_ema_on_saves_the_ema_by_default(tiny_paths, demo_dataset, tmp_path, caplog):
    cfg = tiny_config(tiny_paths, demo_dataset, tmp_path / "run", "precision.mixed=no", "ema.enabled=true")
    with caplog.at_level(logging.WARNING):
        train(cfg)
    tuned = load_file(str(cfg.run_dir / "tuned.fp32.safetensors"))
    raw = load_file(str(cfg.run_dir / "tuned-raw.fp32.safetensors"))
    from safetensors import safe_open

    with safe_open(str(cfg.run_dir / "tuned.fp32.safetensors"), "pt") as handle:
        assert handle.metadata()["xlbake.weights"] == "ema"
    assert any(not torch.equal(tuned[k], raw[k]) for k in tuned)
    assert not [r for r in caplog.records if "no output or sample holds it" in r.getMessage()]


def test_ema_thrown_away_is_warned_about(tiny_paths, demo_dataset, tmp_path, caplog):
    cfg = tiny_config(
        tiny_paths,
        demo_dataset,
        tmp_path / "run",
        "precision.mixed=no",
        "train.max_steps=1",
        "ema.enabled=true",
        "checkpoint.weights=raw",
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert not (cfg.run_dir / "tuned-raw.fp32.safetensors").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("EMA" in w and "checkpoint.weights" in w for w in warnings), warnings
