"""The fixed inputs ``xlbake fidelity`` compares the models on: random noisy latents (the default), or a dataset's
own images and captions.

From a dataset (``--inputs dataset``), the images of one split (:func:`xlbake.data.run_images.split_items`; by
default the half ``extract --calibrate`` never saw) are each resized to the bucket of their aspect ratio nearest to
the run's resolution, encoded by the base's VAE (posterior mean, as calibration does), and noised at
``per_image`` timesteps; each is paired with its own caption. The timesteps are stratified over the schedule with a
random offset inside each stratum, and noise and offsets come from ``seed`` + :data:`HELD_OUT_SEED_OFFSET`, so
neither repeats the noise levels or noise calibration used. Images of one bucket size form one group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from xlbake.data.run_images import bucket_size, dataset_source, load_pixels, run_items, split_items
from xlbake.errors import InputError
from xlbake.evaluate.grid import ModelWeights
from xlbake.sdxl.checkpoint import open_checkpoint
from xlbake.sdxl.models import resolve_architecture

HELD_OUT_SEED_OFFSET = 1_000_003
"""Added to the fidelity seed for dataset inputs: calibration seeds its noise with small seeds (0 by default)."""


@dataclass(frozen=True)
class FidelityInputs:
    """The fixed inputs every model variant predicts on. N samples, P prompts."""

    latents: Tensor  # (N, 4, h, w) noisy latents
    timesteps: Tensor  # (N,) long
    prompt_index: Tensor  # (N,) long, into prompts
    prompts: tuple[str, ...]
    time_ids: Tensor  # (N, 6) SDXL size/crop conditioning


@dataclass(frozen=True)
class DatasetInputs:
    """Inputs from a dataset's images: one group per latent size, and the image files used, in order."""

    groups: tuple[FidelityInputs, ...]
    images: tuple[Path, ...]


def make_inputs(
    n_samples: int,
    latent_size: tuple[int, int],
    prompts: Sequence[str],
    alphas_cumprod: Tensor,
    *,
    seed: int,
    vae_scale: int,
) -> FidelityInputs:
    """N noisy latents x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε with x0, ε ~ N(0, 1) from ``seed``.

    Timesteps are spread evenly over the schedule (one per stratum of ``alphas_cumprod``'s T steps); sample i uses
    prompt i mod P. Time ids: original = target size = latent size * ``vae_scale``, crop (0, 0).
    """
    if n_samples < 1 or not prompts:
        raise ValueError("make_inputs: need at least one sample and one prompt")
    gen = torch.Generator().manual_seed(seed)
    height, width = latent_size
    x0 = torch.randn(n_samples, 4, height, width, generator=gen)
    noise = torch.randn(n_samples, 4, height, width, generator=gen)
    steps = len(alphas_cumprod)
    timesteps = ((torch.arange(n_samples) + 0.5) * steps / n_samples).long().clamp(0, steps - 1)
    timesteps = timesteps[torch.randperm(n_samples, generator=gen)]
    latents = _noised(x0, noise, alphas_cumprod, timesteps)
    size = [height * vae_scale, width * vae_scale]
    time_ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32).repeat(n_samples, 1)
    return FidelityInputs(latents, timesteps, torch.arange(n_samples) % len(prompts), tuple(prompts), time_ids)


def _noised(x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε per sample (the DDPM forward process diffusers' ``add_noise`` computes)."""
    alpha = alphas_cumprod.float()[timesteps].view(-1, 1, 1, 1)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def dataset_inputs(
    base: str | os.PathLike,
    dataset: Path,
    *,
    split: str = "heldout",
    per_image: int = 2,
    seed: int = 0,
    components: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    resolution: int | None = None,
) -> DatasetInputs:
    """Noisy VAE latents of the ``split`` images of ``dataset`` (a finetune run folder or a kohya dataset root),
    ``per_image`` each, prompted by their captions (see the module docstring).

    ``resolution``: of a dataset root (a run's own is read from its config); default: the base UNet's native size.
    InputError for a path that is neither, or a split without images.
    """
    from diffusers import DDPMScheduler

    arch = resolve_architecture(Path(base), components)
    data = dataset_source(Path(dataset), resolution=resolution or int(arch.unet["sample_size"]) * arch.vae_scale)
    items = sorted(split_items(run_items(data, seed=0), split), key=lambda item: str(item.image))
    if not items:
        raise InputError(f"{dataset}: no images in the {split} split; use --split all for a dataset of one image")
    with open_checkpoint(base) as reader:
        vae = ModelWeights.load(reader, arch, ("vae",), device=torch.device(device), dtype=torch.float32).models["vae"]
    gen = torch.Generator().manual_seed(seed + HELD_OUT_SEED_OFFSET)
    alphas = DDPMScheduler.from_config(arch.scheduler).alphas_cumprod
    timesteps = _stratified(len(items) * per_image, len(alphas), gen).view(len(items), per_image)
    by_size: dict[tuple[int, int], list[tuple[Tensor, Tensor, str]]] = {}
    with torch.no_grad():
        for item, steps in zip(items, timesteps, strict=True):
            size = bucket_size(*item.size, data)
            pixels = load_pixels(item.image, size).to(vae.device)
            x0 = (vae.encode(pixels).latent_dist.mean * arch.vae["scaling_factor"]).cpu().repeat(per_image, 1, 1, 1)
            noisy = _noised(x0, torch.randn(x0.shape, generator=gen), alphas, steps)
            by_size.setdefault(size, []).append((noisy, steps, item.caption))
    groups = tuple(_group(size, samples) for size, samples in sorted(by_size.items()))
    return DatasetInputs(groups, tuple(item.image for item in items))


def _stratified(n: int, steps: int, gen: torch.Generator) -> Tensor:
    """(n,) long: one timestep in each of n equal strata of the schedule, at a random point of it, shuffled."""
    points = (torch.arange(n) + torch.rand(n, generator=gen)) * steps / n
    return points.long().clamp(0, steps - 1)[torch.randperm(n, generator=gen)]


def _group(size: tuple[int, int], samples: Sequence[tuple[Tensor, Tensor, str]]) -> FidelityInputs:
    """One group of images of pixel ``size`` (w, h): each image's noisy latents (K, 4, h, w), timesteps, caption."""
    latents = torch.cat([noisy for noisy, _, _ in samples])
    per_image = len(samples[0][1])
    width, height = size
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(latents), 1)
    return FidelityInputs(
        latents=latents,
        timesteps=torch.cat([steps for _, steps, _ in samples]),
        prompt_index=torch.arange(len(samples)).repeat_interleave(per_image),
        prompts=tuple(caption for _, _, caption in samples),
        time_ids=time_ids,
    )
