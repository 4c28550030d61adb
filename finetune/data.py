"""Training data: kohya-layout images in aspect-ratio buckets, re-cropped and re-captioned every epoch (the batches
they are drawn in: ``finetune.sampler``).

Reproducibility: every random draw of a sample (flip, crop offset, caption shuffle/dropout) comes from a
generator seeded by (seed, epoch, index), so a run and a resumed run see the same samples whatever the number of
DataLoader workers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from finetune.buckets import BucketGrid, CropGeometry, Size, crop_geometry
from finetune.captions import CaptionConfig, process_caption
from finetune.text import tokenize_chunks
from xlbake.data.kohya import (
    IMAGE_EXTENSIONS,
    LEFT_OUT_KINDS,
    CaptionSource,
    Problem,
    Scan,
    open_image,
    read_dataset,
)
from xlbake.errors import ConfigError, InputError

EMPTY_REASONS = ("no_repeats", "outside_subset", "unsupported_subset", "empty_subset", "unsupported_file")
"""Scan findings that explain a dataset without usable image, most telling first."""
LISTED_FILES = 20
"""How many files a warning lists before "... and N more"."""
NAMED_IN_ERROR = 3


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, how they are bucketed and augmented, and what to do with bad files."""

    roots: tuple[Path, ...] = ()
    """Dataset roots in kohya layout: each holds `N_name` folders (N = repeats per epoch) of images and captions."""
    dataset_toml: Path | None = None
    """A kohya sd-scripts dataset TOML ([[datasets]] / [[datasets.subsets]] with image_dir, num_repeats,
    class_tokens, caption_extension and caption options), used in addition to `roots`."""
    triggers: tuple[str, ...] = ()
    """Trigger words of the dataset (a concept sets its own): written with the tag counts into every checkpoint and
    LoRA as modelspec.trigger_phrase, which UIs and CivitAI show."""
    resolution: int = 1024
    """Training resolution: buckets have at most resolution^2 pixels."""
    min_bucket_reso: int = 256
    """Smallest bucket side."""
    max_bucket_reso: int = 2048
    """Largest bucket side."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (64 for SDXL; 8 for the tiny model)."""
    no_upscale: bool = False
    """Never enlarge images: small images get a bucket of about their own size instead of the closest-aspect one."""
    random_crop: bool = False
    """Crop a random part of the resized image, re-drawn every epoch (else the center); SDXL is conditioned on the
    real crop offset."""
    flip: bool = False
    """Mirror half of the images horizontally, re-drawn every epoch."""
    caption_extension: str = ".txt"
    """Caption file of `image.png` is `image` + this."""
    caption_source: CaptionSource = "file"
    """Captions from `file`, the image's `filename` (minus a " (2)" copy suffix), `file_or_filename` (file, else
    file name) or `file_or_folder` (file, else the folder's name after N_, as kohya does)."""
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    """Image file types to train on (case-insensitive)."""
    on_bad_image: Literal["skip", "error"] = "error"
    """Unreadable image, missing/empty caption or image below min_image_side: `error` stops before training naming
    the files; `skip` leaves them out with one warning listing them."""
    min_image_side: int | None = None
    """Images whose shorter side is below this are bad data; null = min_bucket_reso."""
    cache_latents: bool = False
    """Encode each image with the VAE once and cache the latents on disk (only without random_crop)."""

    def __post_init__(self) -> None:
        errors = []
        if self.cache_latents and self.random_crop:
            errors.append("data.cache_latents needs data.random_crop: false (a cached latent cannot be re-cropped)")
        if self.bucket_step <= 0 or self.bucket_step % 8:
            errors.append(f"data.bucket_step must be a positive multiple of 8, got {self.bucket_step}")
        else:
            try:
                self.bucket_grid()
            except ValueError as err:
                errors.append(f"data: {err}")
        if self.min_image_side is not None and self.min_image_side < 1:
            errors.append(f"data.min_image_side must be >= 1 or null, got {self.min_image_side}")
        if not self.image_extensions or not self.caption_extension:
            errors.append("data.image_extensions and data.caption_extension must not be empty")
        if errors:
            raise ConfigError("; ".join(errors))

    def bucket_grid(self) -> BucketGrid:
        return BucketGrid(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_step, self.no_upscale
        )


@dataclass(frozen=True)
class Sample:
    """One image of the dataset, ready to draw training samples from."""

    image: Path
    caption: str
    size: Size
    """(w, h) of the image as displayed."""
    bucket: Size
    """(bw, bh) of its bucket."""
    repeats: int
    caption_cfg: CaptionConfig


class TrainDataset(Dataset):
    """Map-style dataset over the images expanded by their repeats.

    An index is an ``int`` (drawn at ``self.epoch``, see ``set_epoch``) or an ``(epoch, index)`` pair, which is
    what ``BucketBatchSampler`` yields so that DataLoader workers never need to be told the epoch. An item is a
    dict: pixel_values (3, H, W) fp32 in [-1, 1], or with a ``latent_source`` (the latent cache) latent_dist
    (8, h, w), the VAE posterior's (mean, logvar); original_size, crop_top_left, target_size (2,) long as (h, w),
    (top, left), (h, w); caption str (processed); input_ids_1, input_ids_2 (C, 77) long; path str.
    """

    def __init__(self, samples: Sequence[Sample], tokenizers: tuple, *, random_crop: bool, flip: bool, seed: int):
        self.samples = tuple(samples)
        self.tokenizers = tokenizers
        self.random_crop, self.flip, self.seed = random_crop, flip, seed
        self.sample_of = tuple(i for i, s in enumerate(self.samples) for _ in range(s.repeats))
        self.epoch = 0
        self.latent_source: Callable[[int, bool], Tensor] | None = None  # (sample index, flip) -> latent_dist

    def __len__(self) -> int:
        return len(self.sample_of)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices."""
        self.epoch = epoch

    def bucket_groups(self) -> dict[Size, list[int]]:
        """Bucket (bw, bh) -> dataset indices in it, buckets sorted."""
        groups: dict[Size, list[int]] = {}
        for index, sample_index in enumerate(self.sample_of):
            groups.setdefault(self.samples[sample_index].bucket, []).append(index)
        return dict(sorted(groups.items()))

    def geometry(self, epoch: int, index: int) -> tuple[CropGeometry, random.Random]:
        """The crop of dataset index ``index`` in ``epoch``, and the generator left for its caption."""
        sample = self.samples[self.sample_of[index]]
        rng = random.Random(_seed_for(self.seed, epoch, index))
        flip = self.flip and rng.random() < 0.5
        jitter = (rng.random(), rng.random()) if self.random_crop else None
        return crop_geometry(*sample.size, sample.bucket, jitter=jitter, flip=flip), rng

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        sample = self.samples[self.sample_of[index]]
        geometry, rng = self.geometry(epoch, index)
        caption = process_caption(sample.caption, sample.caption_cfg, epoch, rng)
        length = sample.caption_cfg.max_token_length
        image = (
            {"latent_dist": self.latent_source(self.sample_of[index], geometry.flip)}
            if self.latent_source is not None
            else {"pixel_values": load_pixels(sample.image, geometry, sample.size)}
        )
        return {
            **image,
            "original_size": torch.tensor(geometry.original_size_hw, dtype=torch.long),
            "crop_top_left": torch.tensor(geometry.crop_top_left, dtype=torch.long),
            "target_size": torch.tensor(geometry.target_size_hw, dtype=torch.long),
            "caption": caption,
            "input_ids_1": tokenize_chunks(self.tokenizers[0], caption, length),
            "input_ids_2": tokenize_chunks(self.tokenizers[1], caption, length),
            "path": str(sample.image),
        }


def load_pixels(path: Path, geometry: CropGeometry, size: Size) -> Tensor:
    """The image resized, cropped and flipped per ``geometry``: (3, H, W) fp32 in [-1, 1]."""
    image = open_image(path)
    if image.size != size:
        raise InputError(f"{path}: image changed since the dataset was checked ({size} -> {image.size}); restart")
    (bucket_h, bucket_w), left, top = geometry.target_size_hw, geometry.crop_left, geometry.crop_top
    image = image.resize(geometry.resize, Image.Resampling.LANCZOS).crop((left, top, left + bucket_w, top + bucket_h))
    if geometry.flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items (one bucket): tensors get a leading batch axis, strings become lists."""
    return {
        key: torch.stack([item[key] for item in batch])
        if isinstance(batch[0][key], Tensor)
        else [item[key] for item in batch]
        for key in batch[0]
    }


@dataclass(frozen=True)
class CheckedData:
    """A scanned and checked dataset: the samples that train, and what the user should be told about."""

    samples: tuple[Sample, ...]
    notes: tuple[tuple[Path, str], ...]
    """(path, message) of findings that leave data out (misnamed folders, ignored files or TOML keys)."""
    skipped: tuple[tuple[Path, str], ...]
    """(path, reason) of the bad files left out (data.on_bad_image=skip)."""


def read_training_data(cfg: DataConfig, caption_cfg: CaptionConfig) -> CheckedData:
    """Read the dataset (``xlbake.data.kohya.read_dataset``, as the dataset tools do: decodes every image once),
    without logging (call it before anything heavy).

    Bad data (unreadable or corrupt image, missing/empty caption, image smaller than ``min_image_side``) is
    refused with an InputError naming the first files unless ``cfg.on_bad_image`` is ``skip``. When no image is
    left, the InputError names what left the images out (e.g. a folder without its ``N_`` repeats prefix).
    """
    scan = read_dataset(
        cfg.roots,
        cfg.dataset_toml,
        caption_extension=cfg.caption_extension,
        caption_source=cfg.caption_source,
        image_extensions=cfg.image_extensions,
    )
    samples, bad = _check_sizes(scan, cfg, caption_cfg)
    bad = [(p.path, p.message) for p in scan.problems if p.kind in LEFT_OUT_KINDS] + bad
    notes = [p for p in scan.problems if p.kind not in LEFT_OUT_KINDS]
    if bad and cfg.on_bad_image == "error":
        named = "; ".join(f"{path}: {why}" for path, why in bad[:NAMED_IN_ERROR])
        more = f" (and {len(bad) - NAMED_IN_ERROR} more)" if len(bad) > NAMED_IN_ERROR else ""
        raise InputError(
            f"{len(bad)} bad dataset files: {named}{more}; fix or remove them, or set "
            f"data.on_bad_image=skip to train without them"
        )
    if not samples:
        raise _no_images(cfg, bad, notes)
    return CheckedData(tuple(samples), tuple((p.path, p.message) for p in notes), tuple(bad))


def build_dataset(
    cfg: DataConfig,
    caption_cfg: CaptionConfig,
    tokenizers: tuple,
    *,
    seed: int = 0,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    checked: CheckedData | None = None,
) -> TrainDataset:
    """The training dataset of ``cfg``, read by ``read_training_data`` (pass ``checked`` if that was done already).

    Logs one warning for the notes, one for the skipped bad files, and the bucket summary.
    """
    log = logger or logging.getLogger(__name__)
    checked = checked or read_training_data(cfg, caption_cfg)
    if checked.notes:
        log.warning("dataset notes (%d):\n%s", len(checked.notes), _listing(checked.notes))
    if checked.skipped:
        log.warning(
            "skipping %d bad dataset files (data.on_bad_image=skip):\n%s",
            len(checked.skipped),
            _listing(checked.skipped),
        )
    dataset = TrainDataset(checked.samples, tokenizers, random_crop=cfg.random_crop, flip=cfg.flip, seed=seed)
    summary = ", ".join(f"{w}x{h}: {len(ix)}" for (w, h), ix in dataset.bucket_groups().items())
    log.info(
        "dataset: %d images, %d samples per epoch with repeats; buckets %s", len(checked.samples), len(dataset), summary
    )
    return dataset


def _no_images(cfg: DataConfig, bad: Sequence[tuple[Path, str]], notes: Sequence[Problem]) -> InputError:
    """The error for a dataset without usable image, naming what left images out (skipped files first)."""
    where = ", ".join(map(str, (*cfg.roots, *([cfg.dataset_toml] if cfg.dataset_toml else []))))
    telling = sorted((p for p in notes if p.kind in EMPTY_REASONS), key=lambda p: EMPTY_REASONS.index(p.kind))
    reasons = [*bad, *((p.path, p.message) for p in telling)]
    found = "; ".join(f"{path}: {why}" for path, why in reasons[:NAMED_IN_ERROR])
    return InputError(
        f"no usable image in {where or 'data.roots (empty)'}{f' ({found})' if found else ''}; expected N_name "
        f"folders of images with {cfg.caption_extension} captions"
    )


def _check_sizes(scan: Scan, cfg: DataConfig, caption_cfg: CaptionConfig) -> tuple[list[Sample], list]:
    """The usable samples of a read dataset, and (path, reason) of the images below min_image_side."""
    grid = cfg.bucket_grid()
    min_side = cfg.min_image_side if cfg.min_image_side is not None else cfg.min_bucket_reso
    samples, bad = [], []
    for subset in scan.subsets:
        subset_caption_cfg = _subset_caption_cfg(caption_cfg, subset.caption_options, subset.root)
        for item in subset.items:
            if min(item.size) < min_side:
                bad.append((item.image, f"{item.size[0]}x{item.size[1]} is smaller than min_image_side {min_side}"))
                continue
            bucket = grid.assign_bucket(*item.size)
            samples.append(Sample(item.image, item.caption, item.size, bucket, subset.repeats, subset_caption_cfg))
    return samples, bad


def _subset_caption_cfg(base: CaptionConfig, options: tuple[tuple[str, Any], ...], where: Path) -> CaptionConfig:
    if not options:
        return base
    try:
        return replace(base, **dict(options))
    except (TypeError, ConfigError) as err:
        raise InputError(f"dataset TOML subset {where}: invalid caption option ({err}); fix the TOML") from err


def _listing(entries: Sequence[tuple[Path, str]]) -> str:
    lines = [f"  {path}: {why}" for path, why in entries[:LISTED_FILES]]
    if len(entries) > LISTED_FILES:
        lines.append(f"  ... and {len(entries) - LISTED_FILES} more")
    return "\n".join(lines)


def _seed_for(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])
