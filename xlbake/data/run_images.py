"""A finetune run's captioned images as calibration and evaluation read them: its dataset settings, one split into
a calibration half and a held-out half, bucket sizes and pixels.

The split is the one rule every consumer uses (``extract --calibrate`` computes statistics on the calibration half,
``xlbake fidelity --inputs dataset`` measures on the held-out half), so what is measured is never what was fitted.
It is decided per image by a hash of its concept folder and file name, never by the file-system order, a seed or
where the dataset lives (RUN/builtin/demo or data/): within each concept folder the images are ordered by that hash
and the first ceil(n / 2) are the calibration half. Each concept thus lands in both halves.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from xlbake.data.kohya import Item, open_image, scan_dataset
from xlbake.errors import InputError

SPLITS = ("calibration", "heldout", "all")
"""The image sets: the calibration half, the held-out half, every image."""
SPLIT_SALT = "xlbake-split-v1"
"""Hashed with each image's name: changing it would move images between the halves of existing runs."""
BUILTIN = "builtin:"
RUN_CONFIG = "config.resolved.yaml"


@dataclass(frozen=True)
class RunData:
    """Where a run's images are and how they are sized (its resolved config's data section)."""

    roots: tuple[Path, ...]
    toml: Path | None
    caption_extension: str
    caption_source: str
    image_extensions: tuple[str, ...]
    resolution: int
    bucket_step: int
    min_bucket: int
    max_bucket: int


def split_items(items: Sequence[Item], split: str) -> list[Item]:
    """The ``split`` ("calibration", "heldout" or "all", see :data:`SPLITS`) of ``items``, in their given order."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "all":
        return list(items)
    folders: dict[str, list[Item]] = {}
    for item in items:
        folders.setdefault(item.image.parent.name, []).append(item)
    calibration = set()
    for name, group in folders.items():
        ranked = sorted(group, key=lambda item: _split_key(name, item))
        calibration.update(item.image for item in ranked[: (len(ranked) + 1) // 2])
    return [item for item in items if (item.image in calibration) == (split == "calibration")]


def _split_key(folder: str, item: Item) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}/{folder}/{item.image.name}".encode()).hexdigest()


def read_run(run: Path) -> RunData:
    """The dataset settings of finetune run ``run`` (its ``config.resolved.yaml``); builtin roots map to RUN/builtin."""
    path = run / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"{run}: no {RUN_CONFIG}; expected a finetune run folder")
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}

    def root(value: str) -> Path:
        name = Path(value).name
        return run / "builtin" / name[len(BUILTIN) :] if name.startswith(BUILTIN) else Path(value)

    try:
        return RunData(
            roots=tuple(root(r) for r in data.get("roots") or ()),
            toml=Path(data["dataset_toml"]) if data.get("dataset_toml") else None,
            caption_extension=data.get("caption_extension", ".txt"),
            caption_source=data.get("caption_source", "file"),
            image_extensions=tuple(data.get("image_extensions") or (".png", ".jpg", ".jpeg", ".webp")),
            resolution=int(data["resolution"]),
            bucket_step=int(data.get("bucket_step", 64)),
            min_bucket=int(data.get("min_bucket_reso", 256)),
            max_bucket=int(data.get("max_bucket_reso", 2048)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable data section ({exc})") from exc


def dataset_source(path: Path, *, resolution: int) -> RunData:
    """A run folder's dataset settings, or a kohya dataset root at ``resolution`` with buckets from half to twice
    it (step 64 px from 512 px up, as kohya's; 8 px below, for the tiny model)."""
    if (path / RUN_CONFIG).is_file():
        return read_run(path)
    if not path.is_dir():
        raise InputError(f"{path}: neither a finetune run folder ({RUN_CONFIG}) nor a dataset folder")
    step = 64 if resolution >= 512 else 8
    return RunData(
        roots=(path,), toml=None, caption_extension=".txt", caption_source="file",
        image_extensions=(".png", ".jpg", ".jpeg", ".webp"), resolution=resolution, bucket_step=step,
        min_bucket=resolution // 2, max_bucket=resolution * 2,
    )  # fmt: skip


def run_items(data: RunData, seed: int) -> list[Item]:
    """Every captioned image of the run, in a fixed order shuffled by ``seed``."""
    scan = scan_dataset(
        data.roots, data.toml, caption_extension=data.caption_extension, caption_source=data.caption_source,
        image_extensions=data.image_extensions,
    )  # fmt: skip
    items = sorted((item for subset in scan.subsets for item in subset.items), key=lambda item: str(item.image))
    if not items:
        raise InputError(f"{', '.join(map(str, data.roots))}: no captioned images found")
    random.Random(seed).shuffle(items)
    return items


def bucket_size(width: int, height: int, data: RunData) -> tuple[int, int]:
    """(w, h): the image's aspect at about ``resolution``² pixels, sides multiples of bucket_step within the limits."""
    step, area = data.bucket_step, data.resolution**2

    def side(value: float) -> int:
        return int(min(max(round(value / step) * step, data.min_bucket, step), data.max_bucket))

    w = side((area * width / height) ** 0.5)
    return w, side(area / w)


def load_pixels(path: Path, size: tuple[int, int]) -> Tensor:
    """(1, 3, h, w) in [-1, 1]: the image scaled to cover ``size`` (w, h) and center-cropped."""
    image = open_image(path)
    scale = max(size[0] / image.width, size[1] / image.height)
    scaled = image.resize((max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))))
    left, top = (scaled.width - size[0]) // 2, (scaled.height - size[1]) // 2
    crop = scaled.crop((left, top, left + size[0], top + size[1]))
    array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]
