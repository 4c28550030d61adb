"""Read a dataset in kohya sd-scripts layout: ``N_name`` folders (N = repeats) of images with caption files, or a
kohya dataset TOML (``[[datasets]]`` / ``[[datasets.subsets]]``) describing the same subsets.

Pure of training: returns what is on disk (subsets of image + caption items) and the problems found. ``read_dataset``
is the one reader the finetune stage and the dataset tools share, so that they count the same images: it also decodes
every image and leaves out the unreadable ones. The ``scan_*`` functions only list (image sizes from file headers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from xlbake.data.kohya_toml import parse_toml
from xlbake.errors import InputError

CaptionSource = Literal["file", "filename", "file_or_filename", "file_or_folder"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height (the image is displayed rotated by 90 degrees)."""
COPY_SUFFIX = re.compile(r" \(\d+\)$")
"""The " (2)" that file managers and bulk-rename tools append to duplicate names."""
REPEATS_PREFIX = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)

GENERIC_NAME = re.compile(
    r"(?:img|image|photo|pic|picture|dsc[fn]?|dcim|pxl|screenshot|scan|frame|file|untitled)?[\d\s_.-]*", re.IGNORECASE
)
"""A camera's or tool's file name ("img06", "IMG_1234", "DSC00012", "00017"): a generic word, a number, no caption."""


@dataclass(frozen=True)
class Item:
    """One training image and its raw caption (first line of the caption file, or from the file/folder name)."""

    image: Path
    caption: str
    decoded_size: tuple[int, int] | None = field(default=None, compare=False)
    """(width, height) found when ``read_dataset`` decoded the image; None when only scanned."""

    @cached_property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed (EXIF rotation applied), read from the file header on first use."""
        return self.decoded_size or image_size(self.image)


@dataclass(frozen=True)
class Subset:
    """One concept folder: its images, each trained ``repeats`` times per epoch."""

    root: Path
    """The folder holding the images."""
    repeats: int
    name: str
    """The folder name after ``N_`` (kohya's class tokens) or, from a TOML, class_tokens or the folder name."""
    items: tuple[Item, ...]
    """The images that train (with a usable caption, and decodable when read by ``read_dataset``)."""
    class_tokens: str | None = None
    """Caption fallback for caption_source "file_or_folder" (kohya uses it for images without a caption file)."""
    caption_options: tuple[tuple[str, Any], ...] = ()
    """Per-subset caption settings from a TOML, as (caption-config field, value) pairs."""
    images: tuple[Path, ...] = ()
    """Every image file of the folder, those left out (no usable caption, unreadable) included."""


@dataclass(frozen=True)
class Problem:
    """Something in the dataset that is skipped or suspicious: ``kind`` is one of PROBLEM_KINDS."""

    path: Path
    kind: str
    message: str


PROBLEM_KINDS = (
    "unreadable_image",  # an image that cannot be decoded (corrupt, truncated; read_dataset only): skipped
    "no_repeats",  # a folder whose name does not start with N_ (N >= 1): skipped
    "missing_caption",  # an image without caption file (caption_source "file"): skipped
    "empty_caption",  # an image whose caption is empty, or whose generic file name gives none: skipped
    "unreadable_caption",  # a caption file that is not UTF-8 text: skipped
    "multiline_caption",  # a caption file with several lines: only the first is used
    "orphan_caption",  # a caption file without image
    "unsupported_file",  # a file that is not an image of the configured types: ignored
    "outside_subset",  # an image directly in a root, outside any N_name folder: ignored
    "unsupported_subset",  # a TOML subset we cannot train (regularization images, metadata files): skipped
    "ignored_key",  # a TOML key with no effect here (set in the training config instead)
    "empty_subset",  # a folder with no usable image
)
LEFT_OUT_KINDS = ("unreadable_image", "missing_caption", "empty_caption", "unreadable_caption")
"""Problems that leave an image of an N_name folder out of training (bad data, see data.on_bad_image)."""


@dataclass(frozen=True)
class Scan:
    """Everything found under the dataset roots or in the TOML."""

    subsets: tuple[Subset, ...]
    problems: tuple[Problem, ...]
    ignored: tuple[Path, ...] = ()
    """Image files under the roots outside any N_name folder (loose, or in a folder without N_): never read."""

    @property
    def n_images(self) -> int:
        """Images that train."""
        return sum(len(s.items) for s in self.subsets)

    @property
    def n_found(self) -> int:
        """Image files found: those that train, those left out and those outside N_name folders."""
        return sum(len(s.images) for s in self.subsets) + len(self.ignored)


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
    """Caption from a file name: the stem without the " (N)" copy suffix that rename tools add to duplicates; ""
    for a generic camera/tool name such as "img06" or "DSC00012", which describes nothing."""
    caption = COPY_SUFFIX.sub("", stem).strip()
    return "" if GENERIC_NAME.fullmatch(caption) else caption


def read_dataset(
    roots: Sequence[Path | str] = (),
    toml: Path | str | None = None,
    *,
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
    inspect: Callable[[Item, Image.Image], None] | None = None,
) -> Scan:
    """The dataset as the finetune stage trains it: ``scan_dataset``, then every image decoded once (with a progress
    bar); an unreadable image becomes an "unreadable_image" Problem and is left out of its subset. ``inspect`` is
    called with each decoded item and its RGB image (for checks that need the pixels)."""
    scan = scan_dataset(
        roots, toml, caption_extension=caption_extension, caption_source=caption_source,
        image_extensions=image_extensions,
    )  # fmt: skip
    problems, subsets = list(scan.problems), []
    progress = tqdm(total=scan.n_images, desc="reading images", unit="img", leave=False, disable=None)
    for subset in scan.subsets:
        items = []
        for item in subset.items:
            progress.update()
            try:
                image = open_image(item.image)
            except InputError as err:
                problems.append(Problem(item.image, "unreadable_image", str(err).removeprefix(f"{item.image}: ")))
                continue
            items.append(Item(item.image, item.caption, image.size))
            if inspect is not None:
                inspect(items[-1], image)
        if subset.items and not items:
            problems.append(Problem(subset.root, "empty_subset", "no readable image in this folder"))
        subsets.append(replace(subset, items=tuple(items)))
    progress.close()
    return Scan(tuple(subsets), tuple(problems), scan.ignored)


def scan_folders(
    roots: Sequence[Path | str],
    *,
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Scan:
    """Scan kohya-layout roots: each subfolder ``N_name`` of a root is a subset repeated N times.

    Raises InputError when a root is not a folder, or is itself an ``N_name`` folder of images (as kohya's
    train_data_dir, a root is the folder holding them); everything else becomes a Problem.
    """
    extensions = _normalize_extensions(image_extensions)
    caption_extension = _dotted(caption_extension)
    subsets, problems, ignored = [], [], []
    for root in map(Path, roots):
        _check_root(root, extensions)
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                if entry.suffix.lower() in extensions:
                    message = "image outside an N_name folder: ignored (move it into e.g. 1_concept/)"
                    problems.append(Problem(entry, "outside_subset", message))
                    ignored.append(entry)
                continue
            match = REPEATS_PREFIX.match(entry.name)
            if not match or int(match.group(1)) < 1:
                message = "folder name does not start with N_ (N >= 1 repeats): skipped; rename it like 2_name"
                problems.append(Problem(entry, "no_repeats", message))
                ignored += _image_files(entry, extensions, recursive=True)
                continue
            name = match.group(2) or ""
            subset = _read_subset(
                entry, int(match.group(1)), name, name, caption_extension, caption_source, extensions, problems
            )
            subsets.append(subset)
    return Scan(tuple(subsets), tuple(problems), tuple(ignored))


def scan_toml(
    path: Path | str,
    *,
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
    image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> Scan:
    """Read a kohya dataset TOML (see ``xlbake.data.kohya_toml.parse_toml``): each ``[[datasets.subsets]]`` with an
    ``image_dir`` is a subset; its caption_extension falls back to the one given here."""
    path = Path(path)
    parsed = parse_toml(path)
    extensions = _normalize_extensions(image_extensions)
    problems = [Problem(path, kind, message) for kind, message in parsed.notes]
    subsets = []
    for spec in parsed.subsets:
        extension = _dotted(spec.caption_extension or caption_extension)
        name = spec.class_tokens or spec.folder.name
        subsets.append(_read_subset(
            spec.folder, spec.repeats, name, spec.class_tokens, extension, caption_source, extensions, problems,
            spec.caption_options,
        ))  # fmt: skip
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
    return Scan(
        tuple(s for p in parts for s in p.subsets),
        tuple(x for p in parts for x in p.problems),
        tuple(x for p in parts for x in p.ignored),
    )


def _check_root(root: Path, extensions: frozenset[str]) -> None:
    if not root.is_dir():
        raise InputError(f"{root}: dataset root is not a folder; set data.roots to folders holding N_name folders")
    match = REPEATS_PREFIX.match(root.name)
    if match and int(match.group(1)) >= 1 and _image_files(root, extensions, recursive=False):
        raise InputError(
            f"{root} is itself an N_name folder of images ({match.group(1)} repeats); a dataset root holds such "
            f"folders: pass its parent {root.parent} as the dataset root"
        )


def _image_files(folder: Path, extensions: frozenset[str], recursive: bool) -> list[Path]:
    """Image files in ``folder`` (and its subfolders if ``recursive``), hidden ones skipped, in path order."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and recursive:
            found += _image_files(entry, extensions, recursive)
        elif entry.is_file() and entry.suffix.lower() in extensions:
            found.append(entry)
    return found


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
    return Subset(folder, repeats, name, tuple(items), class_tokens, caption_options, tuple(images))


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
            message = "the file name gives no caption (empty, or a generic camera name and number): rename it"
            problems.append(Problem(image, "empty_caption", message))
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


def _normalize_extensions(extensions: Iterable[str]) -> frozenset[str]:
    return frozenset(_dotted(ext).lower() for ext in extensions)


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension
