"""Read a dataset in kohya sd-scripts layout: ``N_name`` folders (N = repeats) of images with caption files, or a
kohya dataset TOML (``[[datasets]]`` / ``[[datasets.subsets]]``) describing the same subsets.

Pure of training: returns what is on disk (subsets of image + caption items) and the problems found, for the
finetune stage and for dataset-checking tools alike. Image sizes are read lazily from file headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from xlbake.errors import InputError

CaptionSource = Literal["file", "filename", "file_or_filename", "file_or_folder"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height (the image is displayed rotated by 90 degrees)."""
COPY_SUFFIX = re.compile(r" \(\d+\)$")
"""The " (2)" that file managers and bulk-rename tools append to duplicate names."""
REPEATS_PREFIX = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)

TOML_CAPTION_KEYS: dict[str, tuple[str, type]] = {
    "shuffle_caption": ("shuffle", bool),
    "keep_tokens": ("keep_tokens", int),
    "caption_separator": ("separator", str),
    "caption_dropout_rate": ("dropout_rate", float),
    "caption_dropout_every_n_epochs": ("dropout_every_n_epochs", int),
    "caption_tag_dropout_rate": ("tag_dropout_rate", float),
    "caption_prefix": ("prefix", str),
    "caption_suffix": ("suffix", str),
}
"""kohya TOML caption keys -> (the finetune caption-config field they override for that subset, its type)."""
TOML_SUBSET_KEYS = {"image_dir", "num_repeats", "caption_extension", "class_tokens", "is_reg", *TOML_CAPTION_KEYS}
TOML_TRAINING_KEYS = {
    "resolution": "data.resolution",
    "batch_size": "train.batch_size",
    "enable_bucket": "data (buckets are always on)",
    "min_bucket_reso": "data.min_bucket_reso",
    "max_bucket_reso": "data.max_bucket_reso",
    "bucket_reso_steps": "data.bucket_step",
    "bucket_no_upscale": "data.no_upscale",
    "flip_aug": "data.flip",
    "random_crop": "data.random_crop",
}
"""kohya TOML training keys that our config sets for the whole run instead -> the key to use."""


@dataclass(frozen=True)
class Item:
    """One training image and its raw caption (first line of the caption file, or from the file/folder name)."""

    image: Path
    caption: str

    @cached_property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed (EXIF rotation applied), read from the file header on first use."""
        return image_size(self.image)


@dataclass(frozen=True)
class Subset:
    """One concept folder: its images, each trained ``repeats`` times per epoch."""

    root: Path
    """The folder holding the images."""
    repeats: int
    name: str
    """The folder name after ``N_`` (kohya's class tokens) or, from a TOML, class_tokens or the folder name."""
    items: tuple[Item, ...]
    class_tokens: str | None = None
    """Caption fallback for caption_source "file_or_folder" (kohya uses it for images without a caption file)."""
    caption_options: tuple[tuple[str, Any], ...] = ()
    """Per-subset caption settings from a TOML, as (caption-config field, value) pairs."""


@dataclass(frozen=True)
class Problem:
    """Something in the dataset that is skipped or suspicious: ``kind`` is one of PROBLEM_KINDS."""

    path: Path
    kind: str
    message: str


PROBLEM_KINDS = (
    "no_repeats",  # a folder whose name does not start with N_ (N >= 1): skipped
    "missing_caption",  # an image without caption file (caption_source "file"): skipped
    "empty_caption",  # an image whose caption is empty: skipped
    "unreadable_caption",  # a caption file that is not UTF-8 text: skipped
    "multiline_caption",  # a caption file with several lines: only the first is used
    "orphan_caption",  # a caption file without image
    "unsupported_file",  # a file that is not an image of the configured types: ignored
    "outside_subset",  # an image directly in a root, outside any N_name folder: ignored
    "unsupported_subset",  # a TOML subset we cannot train (regularization images, metadata files): skipped
    "ignored_key",  # a TOML key with no effect here (set in the training config instead)
    "empty_subset",  # a folder with no usable image
)


@dataclass(frozen=True)
class Scan:
    """Everything found under the dataset roots or in the TOML."""

    subsets: tuple[Subset, ...]
    problems: tuple[Problem, ...]

    @property
    def n_images(self) -> int:
        return sum(len(s.items) for s in self.subsets)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed, from its header (EXIF orientations 5-8 swap the sides)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # a PNG's getexif() decodes the whole file to look for EXIF after the pixels: use the header's only
            header_exif = image.format != "PNG" or "exif" in image.info
            if header_exif and image.getexif().get(EXIF_ORIENTATION) in ROTATED_ORIENTATIONS:
                width, height = height, width
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise InputError(f"{path}: cannot read the image ({err}); re-save or remove it") from err
    return width, height


def open_image(path: Path) -> Image.Image:
    """The whole image decoded (truncated and corrupt files fail here), EXIF rotation applied, as RGB."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: unreadable image ({err}); re-save or remove it") from err


def verify_image(path: Path) -> tuple[int, int]:
    """Decode the whole image and return its displayed (width, height); InputError if it cannot be decoded."""
    return open_image(path).size


def caption_from_filename(stem: str) -> str:
    """Caption from a file name: the stem without the " (N)" copy suffix that rename tools add to duplicates."""
    return COPY_SUFFIX.sub("", stem).strip()


def scan_folders(
    roots: Sequence[Path | str],
    *,
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Scan:
    """Scan kohya-layout roots: each subfolder ``N_name`` of a root is a subset repeated N times.

    Raises InputError when a root is not a folder; everything else becomes a Problem.
    """
    extensions = _normalize_extensions(image_extensions)
    caption_extension = _dotted(caption_extension)
    subsets, problems = [], []
    for root in map(Path, roots):
        if not root.is_dir():
            raise InputError(f"{root}: dataset root is not a folder; set data.roots to folders holding N_name folders")
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                if entry.suffix.lower() in extensions:
                    message = "image outside an N_name folder: ignored (move it into e.g. 1_concept/)"
                    problems.append(Problem(entry, "outside_subset", message))
                continue
            match = REPEATS_PREFIX.match(entry.name)
            if not match or int(match.group(1)) < 1:
                message = "folder name does not start with N_ (N >= 1 repeats): skipped; rename it like 2_name"
                problems.append(Problem(entry, "no_repeats", message))
                continue
            name = match.group(2) or ""
            subset = _read_subset(
                entry, int(match.group(1)), name, name, caption_extension, caption_source, extensions, problems
            )
            subsets.append(subset)
    return Scan(tuple(subsets), tuple(problems))


def scan_toml(
    path: Path | str,
    *,
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Scan:
    """Read a kohya dataset TOML: each ``[[datasets.subsets]]`` with an ``image_dir`` is a subset. Values fall back
    subset -> dataset -> ``[general]`` -> the arguments here, as in kohya. Relative image_dir paths are resolved
    against the TOML's folder. Raises InputError when the file cannot be read or an image_dir is missing."""
    path = Path(path)
    data = _load_toml(path)
    extensions = _normalize_extensions(image_extensions)
    general = data.get("general", {})
    subsets, problems = [], []
    _note_ignored_keys(path, "general", general, problems)
    for d, dataset in enumerate(data.get("datasets", [])):
        _note_ignored_keys(path, f"datasets[{d}]", dataset, problems)
        for s, raw in enumerate(dataset.get("subsets", [])):
            where = f"datasets[{d}].subsets[{s}]"
            _note_ignored_keys(path, where, raw, problems)
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **raw}
            subset = _toml_subset(path, where, merged, caption_extension, caption_source, extensions, problems)
            if subset is not None:
                subsets.append(subset)
    return Scan(tuple(subsets), tuple(problems))


def scan_dataset(
    roots: Sequence[Path | str] = (),
    toml: Path | str | None = None,
    *,
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Scan:
    """Scan kohya-layout roots and/or a dataset TOML together (subsets of both, problems of both)."""
    options = {
        "caption_extension": caption_extension,
        "caption_source": caption_source,
        "image_extensions": tuple(image_extensions),
    }
    parts = [scan_folders(roots, **options)] if roots else []
    if toml is not None:
        parts.append(scan_toml(toml, **options))
    return Scan(tuple(s for p in parts for s in p.subsets), tuple(x for p in parts for x in p.problems))


def _read_subset(
    folder: Path,
    repeats: int,
    name: str,
    class_tokens: str | None,
    caption_extension: str,
    caption_source: CaptionSource,
    extensions: frozenset[str],
    problems: list[Problem],
    caption_options: tuple[tuple[str, Any], ...] = (),
) -> Subset:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in extensions]
    stems = {p.stem for p in images}
    items = []
    for image in images:
        caption = _caption_for(image, caption_extension, caption_source, class_tokens, problems)
        if caption is not None:
            items.append(Item(image, caption))
    for other in files:
        if other.suffix.lower() in extensions:
            continue
        if other.name.lower().endswith(caption_extension.lower()):
            if other.name[: -len(caption_extension)] not in stems:
                problems.append(Problem(other, "orphan_caption", "caption file without an image of the same name"))
        else:
            message = f"not an image ({', '.join(sorted(extensions))}): ignored"
            problems.append(Problem(other, "unsupported_file", message))
    if not items:
        problems.append(Problem(folder, "empty_subset", "no image with a usable caption in this folder"))
    return Subset(folder, repeats, name, tuple(items), class_tokens, caption_options)


def _caption_for(
    image: Path,
    caption_extension: str,
    caption_source: CaptionSource,
    class_tokens: str | None,
    problems: list[Problem],
) -> str | None:
    """The raw caption of one image, or None (with a Problem) when it has none."""
    if caption_source == "filename":
        caption = caption_from_filename(image.stem)
        if not caption:
            problems.append(Problem(image, "empty_caption", "the file name gives an empty caption"))
        return caption or None
    caption_file = image.with_name(image.stem + caption_extension)
    if not caption_file.is_file():
        fallback = {"file_or_filename": caption_from_filename(image.stem), "file_or_folder": class_tokens}
        caption = fallback.get(caption_source)
        if caption:
            return caption
        message = f"no caption file {caption_file.name}; write one or set data.caption_source"
        problems.append(Problem(image, "missing_caption", message))
        return None
    try:
        lines = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        problems.append(Problem(caption_file, "unreadable_caption", f"cannot read as UTF-8 text ({err})"))
        return None
    lines = [line for line in lines if line]
    if not lines:
        problems.append(Problem(caption_file, "empty_caption", "caption file is empty"))
        return None
    if len(lines) > 1:
        problems.append(Problem(caption_file, "multiline_caption", f"{len(lines)} lines: only the first is used"))
    return lines[0]


def _toml_subset(
    toml: Path,
    where: str,
    values: Mapping[str, Any],
    caption_extension: str,
    caption_source: CaptionSource,
    extensions: frozenset[str],
    problems: list[Problem],
) -> Subset | None:
    if "image_dir" not in values:
        message = f"{where}: no image_dir (metadata_file subsets are not supported): skipped"
        problems.append(Problem(toml, "unsupported_subset", message))
        return None
    if values.get("is_reg", False):
        problems.append(Problem(toml, "unsupported_subset", f"{where}: regularization images are not used: skipped"))
        return None
    folder = Path(values["image_dir"])
    folder = folder if folder.is_absolute() else toml.parent / folder
    if not folder.is_dir():
        raise InputError(f"{toml}: {where}.image_dir {folder} is not a folder; fix the path in the TOML")
    repeats = values.get("num_repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"{toml}: {where}.num_repeats must be an integer >= 1, got {repeats!r}")
    class_tokens = values.get("class_tokens")
    options = []
    for key, (field, kind) in TOML_CAPTION_KEYS.items():
        if key in values:
            value = values[key]
            if not _has_type(value, kind):
                raise InputError(f"{toml}: {where}.{key} must be {kind.__name__}, got {value!r}; fix the TOML")
            options.append((field, float(value) if kind is float else value))
    extension = _dotted(values.get("caption_extension", caption_extension))
    name = class_tokens or folder.name
    return _read_subset(
        folder, repeats, name, class_tokens, extension, caption_source, extensions, problems, tuple(options)
    )


def _note_ignored_keys(toml: Path, where: str, table: Mapping[str, Any], problems: list[Problem]) -> None:
    for key in table:
        if key in TOML_SUBSET_KEYS or key in ("subsets", "datasets"):
            continue
        hint = f"set {TOML_TRAINING_KEYS[key]} in the training config" if key in TOML_TRAINING_KEYS else "not used"
        problems.append(Problem(toml, "ignored_key", f"{where}.{key}: ignored ({hint})"))


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise InputError(f"{path}: reading a dataset TOML needs Python >= 3.11 or `pip install tomli`") from err
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"{path}: cannot read the dataset TOML ({err})") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a valid TOML file ({err}); fix it or use data.roots instead") from err


def _has_type(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return type(value) is kind
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def _normalize_extensions(extensions: Iterable[str]) -> frozenset[str]:
    return frozenset(_dotted(ext).lower() for ext in extensions)


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension
