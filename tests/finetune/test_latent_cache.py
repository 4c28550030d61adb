"""The latent cache: written once, reused, re-encoded when an image or the VAE changes, equal to encoding the
center crop, and training with it matches training without it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageOps
from safetensors.torch import load_file

from finetune.captions import CaptionConfig
from finetune.config import FinetuneConfig
from finetune.data import DataConfig, build_dataset
from finetune.latent_cache import CACHE_DIR, TENSOR, build_latent_cache, vae_fingerprint
from finetune.trainer import Trainer
from xlbake.config import load_config

TINY_DATA = {"resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_step": 8}


@pytest.fixture(scope="module")
def tiny():
    from xlbake.sdxl.tiny import build_tiny_components

    return build_tiny_components()


@pytest.fixture
def data_root(demo_dataset, tmp_path) -> Path:
    """A copy of the demo dataset that a test may change."""
    return Path(shutil.copytree(demo_dataset, tmp_path / "data"))


@pytest.fixture
def encodes(monkeypatch) -> list[tuple[int, ...]]:
    """The input shape of every VAE encode call."""
    calls: list[tuple[int, ...]] = []
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


@dataclass
class OneProcess:
    """The part of accelerate's Accelerator the cache uses; records the encodes seen at each barrier."""

    encodes: list
    process_index: int = 0
    num_processes: int = 1
    device: torch.device = torch.device("cpu")
    at_barriers: list[int] = field(default_factory=list)

    def wait_for_everyone(self) -> None:
        self.at_barriers.append(len(self.encodes))


def make_dataset(root: Path, tiny, flip: bool = True, **options):
    cfg = DataConfig(roots=(root,), flip=flip, **{**TINY_DATA, **options})
    return build_dataset(cfg, CaptionConfig(), (tiny["tokenizer"], tiny["tokenizer_2"]), seed=3)


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_written_once_then_reused(data_root, tiny, encodes, tmp_path):
    folder = tmp_path / "cache"
    dataset = make_dataset(data_root, tiny)
    n_images = len(dataset.samples)
    cache = build_latent_cache(dataset, tiny["vae"], folder, OneProcess(encodes))
    assert len(encodes) == len(cache_files(folder)) == 2 * n_images  # each image and its mirror image, once
    assert (cache.encoded, cache.reused) == (2 * n_images, 0)
    assert all(shape[0] == 1 for shape in encodes)

    encodes.clear()
    again = build_latent_cache(make_dataset(data_root, tiny), tiny["vae"], folder, OneProcess(encodes))
    assert encodes == [] and (again.encoded, again.reused) == (0, 2 * n_images)
    assert again.files == cache.files


def center_crop(path: Path, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the (w, h) bucket, then cut its middle: computed here by hand, independently."""
    image = Image.open(path).convert("RGB")
    (width, height), (bucket_w, bucket_h) = image.size, bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized = image.resize((round(width * scale), round(height * scale)), Image.Resampling.LANCZOS)
    left, top = (resized.width - bucket_w) // 2, (resized.height - bucket_h) // 2
    return resized.crop((left, top, left + bucket_w, top + bucket_h))


def posterior(vae, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    with torch.no_grad():
        return vae.encode(pixels[None]).latent_dist.parameters[0]


def test_cached_latents_are_the_vae_posterior_of_the_center_crop(data_root, tiny, encodes, tmp_path):
    dataset = make_dataset(data_root, tiny)
    cache = build_latent_cache(dataset, tiny["vae"], tmp_path / "cache", OneProcess(encodes))
    index = next(i for i, s in enumerate(dataset.samples) if s.size[0] * s.bucket[1] != s.size[1] * s.bucket[0])
    sample, vae = dataset.samples[index], tiny["vae"]
    crop = center_crop(sample.image, sample.bucket)
    channels, factor = 2 * vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    assert cache(index, False).shape == (channels, sample.bucket[1] // factor, sample.bucket[0] // factor)
    torch.testing.assert_close(cache(index, False), posterior(vae, crop), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache(index, True), posterior(vae, ImageOps.mirror(crop)), atol=1e-5, rtol=1e-5)

    plain = make_dataset(data_root, tiny)
    dataset.latent_source = cache
    flips = set()
    for key in [(epoch, i) for epoch in range(2) for i in range(len(dataset))]:
        item, reference, flip = dataset[key], plain[key], dataset.geometry(*key)[0].flip
        flips.add(flip)
        assert "pixel_values" not in item and torch.equal(item[TENSOR], cache(dataset.sample_of[key[1]], flip))
        for name in ("original_size", "crop_top_left", "target_size", "input_ids_1", "input_ids_2"):
            assert torch.equal(item[name], reference[name]), name
    assert flips == {False, True}


def test_changed_image_bucket_or_vae_is_reencoded(data_root, tiny, encodes, tmp_path):
    folder, vae = tmp_path / "cache", tiny["vae"]
    build_latent_cache(make_dataset(data_root, tiny, flip=False), vae, folder, OneProcess(encodes))
    changed = sorted(data_root.rglob("*.png"))[2]
    pixels = np.asarray(Image.open(changed).convert("RGB"))
    Image.fromarray(255 - pixels).save(changed)
    encodes.clear()
    dataset = make_dataset(data_root, tiny, flip=False)
    cache = build_latent_cache(dataset, vae, folder, OneProcess(encodes))
    assert (len(encodes), cache.encoded) == (1, 1)
    index = next(i for i, s in enumerate(dataset.samples) if s.image.name == changed.name)
    crop = center_crop(changed, dataset.samples[index].bucket)
    torch.testing.assert_close(cache(index, False), posterior(vae, crop), atol=1e-5, rtol=1e-5)

    encodes.clear()
    build_latent_cache(make_dataset(data_root, tiny, flip=False, resolution=24), vae, folder, OneProcess(encodes))
    assert len(encodes) == len(dataset.samples)  # every bucket changed

    fingerprint, weight = vae_fingerprint(vae), next(vae.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1.0
    try:
        assert vae_fingerprint(vae) != fingerprint
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert vae_fingerprint(vae) == fingerprint
    assert vae_fingerprint(vae.to(torch.float16)) != fingerprint
    vae.to(torch.float32)


def test_unreadable_cache_file_is_reencoded(data_root, tiny, encodes, tmp_path):
    folder = tmp_path / "cache"
    dataset = make_dataset(data_root, tiny, flip=False)
    build_latent_cache(dataset, tiny["vae"], folder, OneProcess(encodes))
    broken = cache_files(folder)[0]
    broken.write_bytes(broken.read_bytes()[:40])
    encodes.clear()
    cache = build_latent_cache(dataset, tiny["vae"], folder, OneProcess(encodes))
    assert (len(encodes), cache.encoded) == (1, 1)
    assert load_file(broken)[TENSOR].dim() == 3


def test_processes_share_the_encoding(data_root, tiny, encodes, tmp_path):
    dataset = make_dataset(data_root, tiny, flip=False)
    n_images = len(dataset.samples)
    second = OneProcess(encodes, process_index=1, num_processes=2)
    cache = build_latent_cache(dataset, tiny["vae"], tmp_path / "cache", second)
    # its share (every second missing latent) before the last barrier; what the other process did not write after
    assert second.at_barriers == [0, n_images // 2]
    assert len(encodes) == cache.encoded == n_images


def run_config(tiny_paths, data_root: Path, run_dir: Path, *overrides: str) -> FinetuneConfig:
    """A two-step center-crop run with flips, everything trained, no extra outputs."""
    data = {
        "run_dir": str(run_dir),
        "model": {"base": str(tiny_paths.single_file), "components": str(tiny_paths.diffusers_dir)},
        "data": {"roots": [str(data_root)], **TINY_DATA, "flip": True},
        "train": {"seed": 3, "epochs": 1, "max_steps": 2, "batch_size": 2},
        "optim": {"unet_lr": 1e-3, "te1_lr": 2e-4, "te2_lr": 2e-4},
        "precision": {"mixed": "no"},
        "checkpoint": {"fp32_copy": False, "save_state": False},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    return load_config(FinetuneConfig, data=data, overrides=overrides)


def train(cfg: FinetuneConfig) -> tuple[float, ...]:
    """The loss of every optimizer step of a run."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train().losses
    finally:
        trainer.cleanup()


def test_training_with_the_cache_matches_training_without(tiny_paths, data_root, encodes, tmp_path):
    plain = train(run_config(tiny_paths, data_root, tmp_path / "plain"))
    n_images, pixel_encodes = len(list(data_root.rglob("*.png"))), len(encodes)
    assert pixel_encodes == 2 and not (tmp_path / "plain" / CACHE_DIR).exists()  # one encode per batch

    encodes.clear()
    cfg = run_config(tiny_paths, data_root, tmp_path / "cached", "data.cache_latents=true")
    cached = train(cfg)
    assert len(encodes) == len(cache_files(cfg.run_dir / CACHE_DIR)) == 2 * n_images  # no encode while training
    assert len(cached) == len(plain) == 2
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-6)

    encodes.clear()
    again = Trainer(cfg)
    try:
        again.setup()  # a rerun in the same RUN/ finds every latent cached
        batch = next(iter(again.loader))
    finally:
        again.cleanup()
    assert encodes == [] and TENSOR in batch and "pixel_values" not in batch
