"""Latent cache (``data.cache_latents``): each image's VAE posterior computed once before training, kept on disk.

What is cached is the posterior's parameters, (mean, log-variance) stacked as diffusers' ``latent_dist.parameters``
(8, h, w), not one sample of it (kohya and the diffusers SDXL example cache one frozen sample). The trainer draws
the latent from them with its own generator exactly as after encoding pixels, so a run with the cache trains like
one without: only the VAE's work is skipped.

Files: ``RUN/cache/latents/<key>.safetensors``, one per image and mirror image. With ``data.flip`` both are cached
(as kohya does with flip_aug) and every epoch the dataset's own flip draw picks one. The key hashes the image's
path, byte size and mtime, its bucket and crop, the flip, and the VAE's weights and dtype: a changed image, bucket
or VAE gets new files, a rerun reuses the old ones. Files that no key names any more are left alone.

Several processes: each encodes its share of the missing files, then all wait and read the same files (RUN/ on a
shared filesystem; a process that still misses files after the wait encodes them itself).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from finetune.buckets import crop_geometry
from finetune.data import Sample, TrainDataset, load_pixels
from xlbake.errors import ConfigError, InputError
from xlbake.fileio import save_safetensors_atomic

logger = logging.getLogger(__name__)

CACHE_DIR = Path("cache") / "latents"
"""The cache folder inside RUN/."""
FORMAT_VERSION = 1
"""Part of every key: raise it when what a cached file holds (or how its pixels are made) changes."""
TENSOR = "latent_dist"
"""Name of the (8, h, w) posterior parameters in a cache file, and of the batch key the dataset fills."""
KEY_META = "xlbake.cache_key"


@dataclass(frozen=True)
class CacheEntry:
    """One cached latent: an image of the dataset, maybe mirrored, and its file."""

    sample: int  # index into TrainDataset.samples
    flip: bool
    key: str
    path: Path


class LatentCache:
    """The dataset's lookup ``(sample index, flip) -> (8, h, w)`` posterior parameters; picklable for workers."""

    def __init__(self, files: Mapping[tuple[int, bool], Path], encoded: int, reused: int) -> None:
        self.files = dict(files)
        self.encoded, self.reused = encoded, reused

    def __call__(self, sample: int, flip: bool) -> Tensor:
        path = self.files[(sample, flip)]
        try:
            return load_file(path)[TENSOR]
        except (OSError, SafetensorError, KeyError) as err:
            raise InputError(f"{path}: cached latent is unreadable ({err}); delete the file and restart") from err


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A hash of the VAE's weights (names, dtypes, shapes, bytes): what cached latents depend on besides pixels."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()[:32]


def entry_key(sample: Sample, flip: bool, vae_id: str) -> str:
    """The cache key of ``sample``'s center crop (mirrored if ``flip``) encoded by the VAE ``vae_id``."""
    geometry = crop_geometry(*sample.size, sample.bucket, flip=flip)
    try:
        stat = Path(sample.image).stat()
    except OSError as err:
        raise InputError(f"{sample.image}: cannot read the image ({err.strerror}); restore it or restart") from err
    fields = (
        FORMAT_VERSION,
        Path(sample.image).resolve(),
        stat.st_size,
        stat.st_mtime_ns,
        sample.size,
        sample.bucket,
        geometry.resize,
        (geometry.crop_left, geometry.crop_top),
        flip,
        vae_id,
    )
    return hashlib.sha256("|".join(map(str, fields)).encode()).hexdigest()[:32]


def plan_entries(dataset: TrainDataset, folder: Path, vae_id: str) -> list[CacheEntry]:
    """Every latent the dataset can ask for: each image, and its mirror image when the dataset flips."""
    flips = (False, True) if dataset.flip else (False,)
    entries = []
    for index, sample in enumerate(dataset.samples):
        for flip in flips:
            key = entry_key(sample, flip, vae_id)
            entries.append(CacheEntry(index, flip, key, folder / f"{key}.safetensors"))
    return entries


def is_cached(entry: CacheEntry) -> bool:
    """True if the entry's file exists, is a readable safetensors file and was written for this key."""
    try:
        with safe_open(entry.path, "pt") as handle:
            return TENSOR in handle.keys() and (handle.metadata() or {}).get(KEY_META) == entry.key  # noqa: SIM118
    except (OSError, SafetensorError):
        return False


@torch.no_grad()
def encode_posterior(vae: Any, pixels: Tensor) -> Tensor:
    """VAE posterior parameters of one image: pixels (3, H, W) in [-1, 1] -> (2 * latent channels, h, w) on CPU,
    in the VAE's dtype (mean and log-variance, as ``DiagonalGaussianDistribution(parameters)`` takes them)."""
    param = next(vae.parameters())
    with torch.autocast(param.device.type, enabled=False):  # the SDXL VAE overflows in fp16
        return vae.encode(pixels[None].to(param.device, param.dtype)).latent_dist.parameters[0].cpu()


def batch_latents(batch: Mapping[str, Any], vae: Any, device: torch.device, generator: torch.Generator) -> Tensor:
    """A batch's latents (B, 4, H/8, W/8) in fp32, scaled for the UNet: drawn with ``generator`` from the cached
    posterior parameters ``batch["latent_dist"]`` (B, 8, h, w), or from the VAE's posterior of
    ``batch["pixel_values"]`` (B, 3, H, W) in [-1, 1], the same way."""
    if TENSOR in batch:
        posterior = DiagonalGaussianDistribution(batch[TENSOR].to(device))
    else:
        pixels = batch["pixel_values"].to(device, vae.dtype)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the SDXL VAE overflows in fp16
            posterior = vae.encode(pixels).latent_dist
    return (posterior.sample(generator=generator) * vae.config.scaling_factor).float()


def encode_entries(
    entries: Sequence[CacheEntry], samples: Sequence[Sample], vae: Any, *, progress: bool = False
) -> None:
    """Encode and write ``entries`` (atomic files); an image with both mirror images is read once."""
    by_sample: dict[int, list[CacheEntry]] = {}
    for entry in entries:
        by_sample.setdefault(entry.sample, []).append(entry)
    bar = tqdm(total=len(entries), desc="caching latents", unit="latent", disable=not progress)
    for index, group in by_sample.items():
        sample = samples[index]
        pixels = load_pixels(sample.image, crop_geometry(*sample.size, sample.bucket), sample.size)  # (3, H, W)
        for entry in group:
            posterior = encode_posterior(vae, pixels.flip(-1) if entry.flip else pixels)
            meta = {KEY_META: entry.key, "xlbake.image": str(sample.image), "xlbake.flip": str(entry.flip)}
            save_safetensors_atomic({TENSOR: posterior}, entry.path, metadata=meta, force=True)
            bar.update()
    bar.close()


def build_latent_cache(
    dataset: TrainDataset, vae: Any, folder: Path, accelerator: Any, *, progress: bool = False
) -> LatentCache:
    """Encode whatever the cache in ``folder`` lacks for ``dataset``; return the lookup to set as the dataset's
    ``latent_source``.

    ``vae``: the frozen AutoencoderKL at its training dtype; it encodes on ``accelerator.device`` and is moved back
    to where it was. ``accelerator``: an accelerate Accelerator (``process_index``, ``num_processes``,
    ``wait_for_everyone``, ``device``); every process must call this.
    """
    if dataset.random_crop:
        raise ConfigError("data.cache_latents needs data.random_crop: false (a cached latent cannot be re-cropped)")
    folder = Path(folder)
    entries = plan_entries(dataset, folder, vae_fingerprint(vae))
    missing = [e for e in entries if not is_cached(e)]
    accelerator.wait_for_everyone()  # every process splits the same list before anyone writes
    home, rank, world = next(vae.parameters()).device, accelerator.process_index, accelerator.num_processes
    if missing:
        vae.to(accelerator.device)
    encode_entries(missing[rank::world], dataset.samples, vae, progress=progress)
    accelerator.wait_for_everyone()
    if world > 1:
        encode_entries([e for e in missing if not is_cached(e)], dataset.samples, vae, progress=progress)
    vae.to(home)
    if rank == 0:
        logger.info("latent cache %s: %d latents encoded, %d reused", folder, len(missing), len(entries) - len(missing))
    files = {(e.sample, e.flip): e.path for e in entries}
    return LatentCache(files, encoded=len(missing), reused=len(entries) - len(missing))
