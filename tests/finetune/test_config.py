"""The finetune config: every shipped preset loads, every option is documented, contradictions are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import FinetuneConfig, builtin_name
from xlbake.config import describe, dump_yaml, load_config
from xlbake.errors import ConfigError

PRESETS = sorted((Path(__file__).parents[2] / "configs" / "finetune").glob("*.yaml"))


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"a100-80gb.yaml", "a100-80gb-ema.yaml", "tiny-cpu.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(preset, tmp_path):
    cfg = load_config(FinetuneConfig, preset)
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(FinetuneConfig, again) == cfg


def test_every_option_is_documented():
    docs = describe(FinetuneConfig)
    assert len(docs) > 80
    undocumented = [d.key for d in docs if not d.doc.strip()]
    assert undocumented == []


def test_guide_recipe_exactly():
    cfg = load_config(FinetuneConfig, PRESETS[0].with_name("a100-80gb.yaml"))
    assert (cfg.optim.name, cfg.optim.unet_lr, cfg.optim.te1_lr, cfg.optim.te2_lr) == ("adamw", 1e-6, 1e-6, 1e-6)
    assert (cfg.optim.scheduler, cfg.optim.warmup_steps, cfg.optim.warmup_ratio) == ("constant", 0, 0.0)
    assert (cfg.precision.mixed, cfg.precision.vae, cfg.precision.full_bf16) == ("fp16", "fp32", False)
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum) == (100, 0, 1, 3)
    assert not cfg.model.gradient_checkpointing and not cfg.data.cache_latents and cfg.data.random_crop
    assert (cfg.data.min_bucket_reso, cfg.data.max_bucket_reso, cfg.data.bucket_step) == (256, 2048, 64)
    assert cfg.loss.min_snr_gamma == 5 and cfg.checkpoint.dtype == "fp16" and cfg.checkpoint.fp32_copy
    assert not cfg.ema.enabled
    ema = load_config(FinetuneConfig, PRESETS[0].with_name("a100-80gb-ema.yaml"))
    assert ema.ema.enabled and ema.ema.beta == 0.9995 and ema.checkpoint.weights == "ema"
    assert ema.optim == cfg.optim and ema.train == cfg.train and ema.data == cfg.data and ema.loss == cfg.loss


def test_tiny_preset_uses_builtins(tmp_path):
    cfg = load_config(FinetuneConfig, PRESETS[0].with_name("tiny-cpu.yaml"), [f"run_dir={tmp_path}"])
    assert builtin_name(cfg.model.base) == "tiny"
    assert [builtin_name(r) for r in cfg.data.roots] == ["demo"]
    assert cfg.run_dir == tmp_path and cfg.precision.mixed == "no"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoint.weights=ema"], "needs ema.enabled"),
        (["optim.unet_lr=0", "optim.te1_lr=0", "optim.te2_lr=0"], "nothing would train"),
        (["optim.warmup_steps=10"], "constant ignores warmup"),
        (["optim.scheduler=cosine", "optim.warmup_steps=10", "optim.warmup_ratio=0.1"], "both set"),
        (["precision.full_bf16=true"], "needs precision.mixed: bf16"),
        (["precision.vae=fp16"], "fp16-fixed VAE"),
        (["optim.name=adam"], "adamw"),
        (["train.on_nan=ignore"], "stop"),
        (["ema.beta=1.5"], "ema.beta"),
        (["train.grad_accum=0"], "train.grad_accum"),
        (["config_version=0"], "config_version"),
    ],
)
def test_contradictions_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, overrides)


def test_numeric_strings_and_builtin_name():
    cfg = load_config(FinetuneConfig, None, ["optim.unet_lr=1e-5"])
    assert cfg.optim.unet_lr == 1e-5
    assert builtin_name(Path("/x/configs/builtin:tiny")) == "tiny"
    assert builtin_name(Path("/x/model.safetensors")) is None


def test_kohya_key_names_are_read_as_ours_with_a_pointer(tmp_path, caplog):
    path = tmp_path / "f.yaml"
    path.write_text("learning_rate: 2e-6\ngradient_accumulation_steps: 4\ntrain:\n  epochs: 3\n")
    cfg = load_config(FinetuneConfig, path, ["train_batch_size=2"])
    assert (cfg.optim.unet_lr, cfg.train.grad_accum, cfg.train.batch_size, cfg.train.epochs) == (2e-6, 4, 2, 3)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "learning_rate is read as optim.unet_lr" in messages and "train.grad_accum" in messages
    path.write_text("learning_rate: 2e-6\noptim:\n  unet_lr: 1e-6\n")
    with pytest.raises(ConfigError, match="learning_rate: another name for optim.unet_lr, which is set too"):
        load_config(FinetuneConfig, path)
