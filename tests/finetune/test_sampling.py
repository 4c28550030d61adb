"""Samples during training: the VAE outside autocast, the EMA weights when the outputs hold them, one device."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_run import tiny_run_sections

from finetune.config import FinetuneConfig, SampleConfig
from finetune.data import collate
from finetune.sampling import render_samples
from finetune.trainer import Trainer
from xlbake.config import load_config
from xlbake.errors import ConfigError
from xlbake.sdxl.tiny import build_tiny_components


@pytest.fixture(scope="module")
def trainer(tiny_paths, demo_dataset, tmp_path_factory):
    """A set-up trainer under bf16 autocast (the CPU stand-in for a GPU's fp16), EMA kept on the CPU, a prompt."""
    data = {
        **tiny_run_sections(tiny_paths, demo_dataset, tmp_path_factory.mktemp("sampling")),
        "train": {"max_steps": 1, "batch_size": 2},
        "precision": {"mixed": "bf16"},
        "ema": {"enabled": True, "device": "cpu"},
        "sample": {"prompts": ["xlbk emblem"], "steps": 2, "width": 32, "height": 32},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    trainer = Trainer(load_config(FinetuneConfig, data=data))
    trainer.setup()
    yield trainer
    trainer.cleanup()


def conv_output_dtypes(module: torch.nn.Module, record: list[torch.dtype]) -> list:
    """Forward hooks appending the output dtype of every conv of ``module`` (its compute dtype under autocast)."""
    return [
        m.register_forward_hook(lambda _m, _in, out: record.append(out.dtype))
        for m in module.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]


def test_vae_decodes_samples_outside_autocast(trainer):
    assert trainer.accelerator.native_amp  # the sampling really runs under autocast
    vae, unet = [], []
    handles = conv_output_dtypes(trainer.model.vae, vae) + conv_output_dtypes(trainer.emas["unet"].ema_model, unet)
    try:
        written = trainer.sample("vae")
    finally:
        for handle in handles:
            handle.remove()
    assert [p.name for p in written] == ["vae-00.png"]
    assert vae and set(vae) == {torch.float32}  # an SDXL VAE overflows in fp16: never autocast
    assert torch.bfloat16 in unet  # the UNet still samples under autocast


def test_vae_encodes_training_images_outside_autocast(trainer):
    vae: list[torch.dtype] = []
    handles = conv_output_dtypes(trainer.model.vae, vae)
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            trainer.training_step(collate([trainer.loader.dataset[(0, 0)]]))
    finally:
        for handle in handles:
            handle.remove()
    assert vae and set(vae) == {torch.float32}


def test_vae_encodes_cached_latents_outside_autocast(trainer):
    from finetune.latent_cache import encode_posterior

    vae: list[torch.dtype] = []
    handles = conv_output_dtypes(trainer.model.vae, vae)
    try:
        with trainer.accelerator.autocast():
            encode_posterior(trainer.model.vae, torch.zeros(3, 32, 32))
    finally:
        for handle in handles:
            handle.remove()
    assert vae and set(vae) == {torch.float32}


def test_samples_use_the_ema_moved_to_the_training_device(trainer, monkeypatch):
    """ema.device cpu: sampling moves the EMA copies to the accelerator's device (one device for the pipeline,
    where the VAE is) and back to the CPU afterwards, so they keep off the GPU while training."""
    moves: list[tuple[str, torch.device]] = []
    used: list[str] = []
    for name, ema in trainer.emas.items():
        module = ema.ema_model

        def spy(*args, _module=module, _name=name, **kwargs):
            moves.append((_name, torch.device(args[0] if args else kwargs["device"])))
            return type(_module).to(_module, *args, **kwargs)

        monkeypatch.setattr(module, "to", spy)
    ema_unet, online_unet = trainer.emas["unet"].ema_model, trainer.model.unet
    hooks = [
        ema_unet.register_forward_pre_hook(lambda *_: used.append("ema")),
        online_unet.register_forward_pre_hook(lambda *_: used.append("online")),
    ]
    try:
        trainer.sample("ema")
    finally:
        for hook in hooks:
            hook.remove()
    assert used and set(used) == {"ema"}  # the outputs hold the EMA (checkpoint.weights auto): so do the samples
    device, cpu = trainer.accelerator.device, torch.device("cpu")
    for name in trainer.emas:
        assert [d for n, d in moves if n == name] == [device, cpu], name


# Each prompt line's kohya options (--w --h --s --l --d --n) override the sample.* defaults.


@pytest.fixture(scope="module")
def parts():
    return build_tiny_components()


def test_prompt_options_set_each_sample_size_and_the_default_the_rest(parts, tmp_path):
    cfg = SampleConfig(prompts=("xlbk emblem --w 16 --h 24 --s 1 --d 3", "xlbk emblem --s 1"), width=32, height=40)
    written = render_samples(parts, cfg, tmp_path, "final")
    assert [p.name for p in written] == ["final-00.png", "final-01.png"]
    assert [Image.open(p).size for p in written] == [(16, 24), (32, 40)]


def test_seed_option_gives_the_same_image_as_that_default_seed(parts, tmp_path):
    size = {"width": 16, "height": 16}
    by_option = render_samples(parts, SampleConfig(prompts=("xlbk --s 1 --d 5",), **size), tmp_path, "a")
    by_default = render_samples(parts, SampleConfig(prompts=("xlbk --s 1",), seed=5, **size), tmp_path, "b")
    assert by_option[0].read_bytes() == by_default[0].read_bytes()


def test_a_bad_prompt_option_is_a_config_error_naming_the_prompt():
    with pytest.raises(ConfigError, match=r"sample.prompts\[1\]: 'dog --x 2': unknown option --x"):
        load_config(FinetuneConfig, data={"sample": {"prompts": ["cat --w 64", "dog --x 2"]}})
