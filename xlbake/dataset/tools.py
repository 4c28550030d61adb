"""Dataset preparation as the guides do it: check a kohya-layout dataset, captions from file names, trigger word and
tag edits, and per-folder repeats that balance several concepts (the steps they make: ``xlbake.data.steps``).

The checks cover what the guides do by hand or with other tools: broken and too small images ("upscale them
first"), missing or empty captions, captions longer than the text encoders read, near-duplicate images (the
guides use dupeGuru; here a perceptual hash) and folders without the ``N_`` repeats prefix.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xlbake.data.kohya import CaptionSource, Item, Problem, Scan, caption_from_filename, read_dataset, scan_folders
from xlbake.errors import InputError
from xlbake.fileio import write_text_atomic

MIN_PIXELS = 640 * 1536
"""Images with fewer pixels need upscaling: 640x1536 is the smallest standard SDXL bucket, "1024x1024 or
equivalent" in the most extreme aspect ratio (832x1216 has 0.96 MP and is fine)."""
HASH_BITS = 8
"""Perceptual hashes are HASH_BITS x HASH_BITS = 64 bits."""
PHASH_SIZE = 32
"""pHash takes the DCT of a PHASH_SIZE x PHASH_SIZE grey image and keeps its lowest 8 x 8 frequencies."""
MAX_HASH_DISTANCE = 6
"""Images whose 64-bit pHashes differ in at most this many bits are near duplicates (re-saved, resized, slightly
cropped or re-coloured copies differ in a few bits; different pictures in about 32)."""
SDXL_TOKENIZER_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
"""Where a cached CLIP tokenizer is looked for when none is given (both SDXL tokenizers count alike)."""
NO_LIMIT = 1_000_000
CLIP_FILES = ("vocab.json", "merges.txt")
"""A slow-format CLIP tokenizer's files (a fast one is a single tokenizer.json)."""
APPROX_TOKEN = re.compile(r"[a-z]+|\d|[^\sa-z\d]+")
"""CLIP's pre-tokenizer splits text into words, single digits and runs of punctuation; each is at least a token."""
CHECK_KINDS = ("small_image", "long_caption", "near_duplicate")
"""Problems `check_dataset` adds to the scan's (see xlbake.data.kohya.PROBLEM_KINDS)."""
DEFAULT_EXPOSURE = 100
"""Images x repeats per concept and epoch the guide aims for ("try shooting for 100": 20 images x 5 repeats)."""


# ---------------------------------------------------------------- check


@dataclass(frozen=True)
class TokenCounter:
    """Counts the CLIP tokens of a caption (without the begin/end tokens)."""

    count: Callable[[str], int]
    description: str
    exact: bool


@dataclass(frozen=True)
class CheckReport:
    """Everything ``check_dataset`` found."""

    problems: tuple[Problem, ...]
    n_images: int
    """Image files found under the roots (those left out or outside N_name folders included)."""
    n_train: int
    """Images the finetune stage trains on (read, with a usable caption; as ``xlbake dataset plan`` counts)."""
    n_folders: int
    tokens: str
    """How caption tokens were counted."""


def token_counter(tokenizer_dir: Path | None = None) -> TokenCounter:
    """The real CLIP tokenizer of a diffusers folder (``DIR/tokenizer``) or tokenizer folder if given, else SDXL's
    from the local Hugging Face cache if there, else an approximate count (a lower bound). Nothing is downloaded."""
    folder = _tokenizer_folder(tokenizer_dir)
    if folder is None:
        return TokenCounter(approx_tokens, "approximate (words + punctuation; the real count can be higher)", False)
    from transformers import CLIPTokenizer  # slow import: only when a tokenizer is there

    # a caption longer than 77 tokens is what we look for: no "sequence is too long" warning for it
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=NO_LIMIT)
    return TokenCounter(lambda text: len(tokenizer.tokenize(text)), f"CLIP tokenizer in {folder}", True)


def approx_tokens(text: str) -> int:
    """Lower bound of the CLIP token count: every word, digit and punctuation run is at least one token."""
    return len(APPROX_TOKEN.findall(text.lower()))


def check_dataset(
    roots: Sequence[Path | str],
    *,
    counter: TokenCounter,
    min_pixels: int = MIN_PIXELS,
    max_tokens: int = 75,
    max_distance: int = MAX_HASH_DISTANCE,
    hasher: str = "phash",
    caption_extension: str = ".txt",
    caption_source: CaptionSource = "file",
) -> CheckReport:
    """Check kohya-layout roots as the finetune stage reads them (``read_dataset``); every finding is a Problem.

    Decodes every image fully (truncated and corrupt files are found), so it reads the whole dataset once.
    ``hasher``: "phash" or "dhash", the perceptual hash compared for near duplicates.
    """
    hash_image = HASHERS[hasher]
    problems: list[Problem] = []
    hashes: dict[Path, int] = {}

    def inspect(item: Item, image: Image.Image) -> None:
        width, height = image.size
        hashes[item.image] = hash_image(image)
        if width * height < min_pixels:
            message = f"{width}x{height} = {width * height / 1e6:.2f} MP < {min_pixels / 1e6:.2f} MP: upscale it first"
            problems.append(Problem(item.image, "small_image", message))
        tokens = counter.count(item.caption)
        if tokens > max_tokens:
            message = f"{tokens} tokens > {max_tokens}: the rest is cut; shorten it or raise caption.max_token_length"
            problems.append(Problem(item.image, "long_caption", message))

    scan = read_dataset(roots, caption_extension=caption_extension, caption_source=caption_source, inspect=inspect)
    for path, other, distance in near_duplicates(hashes, max_distance):
        message = f"near duplicate of {other.name} ({hasher} distance {distance}): keep one"
        problems.append(Problem(path, "near_duplicate", message))
    n_train = scan.n_images
    return CheckReport((*scan.problems, *problems), scan.n_found, n_train, len(scan.subsets), counter.description)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: signs of the lowest 8 x 8 DCT frequencies of a 32 x 32 grey image against their
    median (the pHash of imagehash and dupeGuru-like tools)."""
    pixels = np.asarray(image.convert("L").resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS), np.float64)
    basis = _dct_matrix(PHASH_SIZE)
    low = (basis @ pixels @ basis.T)[:HASH_BITS, :HASH_BITS]
    return _bits_to_int(low > np.median(low))


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: whether each pixel of a 9 x 8 grey image is brighter than its left neighbour."""
    pixels = np.asarray(image.convert("L").resize((HASH_BITS + 1, HASH_BITS), Image.Resampling.LANCZOS), np.int16)
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def near_duplicates(hashes: dict[Path, int], max_distance: int) -> list[tuple[Path, Path, int]]:
    """(path, closest earlier path, Hamming distance) for every image within ``max_distance`` bits of an earlier one
    (in path order), so the first image of each group of look-alikes is the one not reported."""
    paths = sorted(hashes)
    if not paths:
        return []
    codes = np.array([hashes[p] for p in paths], dtype=np.uint64)
    popcount = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    found = []
    for i in range(1, len(paths)):
        xor = np.bitwise_xor(codes[:i], codes[i])
        distances = popcount[xor.view(np.uint8).reshape(i, 8)].sum(axis=1)
        j = int(np.argmin(distances))
        if distances[j] <= max_distance:
            found.append((paths[i], paths[j], int(distances[j])))
    return found


HASHERS: dict[str, Callable[[Image.Image], int]] = {"phash": phash, "dhash": dhash}


def _tokenizer_folder(tokenizer_dir: Path | None) -> Path | None:
    if tokenizer_dir is not None:
        for folder in (tokenizer_dir / "tokenizer", tokenizer_dir):
            if (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in CLIP_FILES):
                return folder
        raise InputError(
            f"{tokenizer_dir}: no CLIP tokenizer (tokenizer/vocab.json, merges.txt); give a diffusers folder"
        )
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    files = [try_to_load_from_cache(SDXL_TOKENIZER_REPO, f"tokenizer/{name}") for name in CLIP_FILES]
    return Path(files[0]).parent if all(isinstance(f, str) for f in files) else None


def _dct_matrix(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II basis: row k is the k-th cosine."""
    k, x = np.mgrid[0:n, 0:n]
    basis = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis


def _bits_to_int(bits: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in bits.flatten()), 2)


# ---------------------------------------------------------------- captions and tags


@dataclass(frozen=True)
class CaptionFiles:
    """What ``captions_from_filenames`` did."""

    written: tuple[Path, ...]
    kept: tuple[Path, ...]
    """Existing caption files left alone (pass force to replace them)."""
    empty: tuple[Path, ...]
    """Images whose file name gives no caption (empty, or a generic camera name such as "img06")."""
    skipped: tuple[Path, ...]
    """Folders and images outside N_name folders, which the finetune stage never reads: left alone."""


@dataclass(frozen=True)
class TagEdit:
    """What ``edit_tags`` changed (or would change with dry_run)."""

    changed: tuple[tuple[Path, str, str], ...]
    """(caption file, old first line, new first line)."""
    unchanged: int
    no_caption: tuple[Path, ...]
    """Images without a caption file."""
    skipped: tuple[Path, ...]
    """Folders and images outside N_name folders, which the finetune stage never reads: left alone."""


def dataset_images(root: Path | str, *, extension: str = ".txt") -> tuple[list[Path], list[Path]]:
    """The image files the finetune stage reads under ``root`` (those of its N_name folders, captioned or not; see
    ``xlbake.data.kohya.scan_folders``), and the folders and images outside N_name folders that it skips."""
    scan = scan_folders([Path(root)], caption_extension=extension)
    skipped = sorted(p.path for p in scan.problems if p.kind in ("no_repeats", "outside_subset"))
    return sorted(image for subset in scan.subsets for image in subset.images), skipped


def captions_from_filenames(root: Path | str, *, extension: str = ".txt", force: bool = False) -> CaptionFiles:
    """Write each image's caption file from its name (minus a " (2)"-style copy suffix), as the guide's script does.

    Only in N_name folders (the others are never trained); existing caption files are kept unless ``force``.
    """
    written, kept, empty = [], [], []
    images, skipped = dataset_images(root, extension=extension)
    for image in images:
        target = image.with_name(image.stem + extension)
        caption = caption_from_filename(image.stem)
        if not caption:
            empty.append(image)
        elif target.exists() and not force:
            kept.append(target)
        else:
            write_text_atomic(target, caption + "\n", force=force)
            written.append(target)
    return CaptionFiles(tuple(written), tuple(kept), tuple(empty), tuple(skipped))


def split_tags(text: str, separator: str = ",") -> list[str]:
    """The non-empty, stripped pieces of a caption line: booru tags, or the clauses of a sentence."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def edit_caption(line: str, *, add: Sequence[str] = (), remove: Iterable[str] = (), keep: int = 0) -> str:
    """One caption line with ``add`` inserted after its first ``keep`` tags and whole tags in ``remove`` dropped.

    Works for tag lists and natural language alike: removal only drops comma-separated pieces equal to a given
    tag (case-insensitive), never words inside a sentence; a tag to add is skipped when the caption already holds
    it as whole words anywhere ("a woman wearing kncr outfit" already has "kncr").
    """
    drop = {tag.strip().lower() for tag in remove}
    pieces = split_tags(line)
    tags = [tag for tag in pieces if tag.lower() not in drop]
    new = list(dict.fromkeys(tag.strip() for tag in add if not _contains_phrase(", ".join(tags), tag)))
    if not new and len(tags) == len(pieces):
        return line.strip()  # nothing to do: keep the caption exactly as written
    return ", ".join(tags[:keep] + new + tags[keep:])


def edit_tags(
    root: Path | str,
    *,
    add: Sequence[str] = (),
    remove: Iterable[str] = (),
    keep: int = 0,
    extension: str = ".txt",
    dry_run: bool = False,
) -> TagEdit:
    """Edit the first line of every caption file of the N_name folders under ``root`` (atomic writes; other lines
    kept); folders the finetune stage skips are left alone."""
    remove = tuple(remove)
    changed, unchanged, missing = [], 0, []
    images, skipped = dataset_images(root, extension=extension)
    for image in images:
        path = image.with_name(image.stem + extension)
        if not path.is_file():
            missing.append(image)
            continue
        text = _read_caption(path)
        first, newline, rest = text.partition("\n")
        new_first = edit_caption(first, add=add, remove=remove, keep=keep)
        if new_first == first.strip():
            unchanged += 1
            continue
        changed.append((path, first.strip(), new_first))
        if not dry_run:
            write_text_atomic(path, new_first + newline + rest, force=True)
    return TagEdit(tuple(changed), unchanged, tuple(missing), tuple(skipped))


def tag_frequencies(root: Path | str, *, extension: str = ".txt") -> tuple[list[tuple[str, int]], int]:
    """(tag, number of captions holding it) most frequent first, and the number of captions read (N_name folders)."""
    counts: Counter[str] = Counter()
    n_captions = 0
    for image in dataset_images(root, extension=extension)[0]:
        path = image.with_name(image.stem + extension)
        if path.is_file():
            n_captions += 1
            counts.update(dict.fromkeys(split_tags(_read_caption(path).partition("\n")[0]), 1))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), n_captions


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", text, re.IGNORECASE) is not None


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the caption as UTF-8 text ({err}); re-save it as UTF-8") from err


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class FolderPlan:
    """One concept folder and the repeats that bring its images x repeats near the target exposure."""

    name: str
    images: int
    repeats: int
    suggested_repeats: int
    """round(target / images), at least 1: all images kept."""
    trim_repeats: int
    """ceil(target / images): with ``trim_images`` images this hits the target, as the guide trims folders."""
    trim_images: int

    @property
    def exposure(self) -> int:
        return self.images * self.repeats


def suggest_repeats(images: int, target: int = DEFAULT_EXPOSURE) -> tuple[int, int, int]:
    """(repeats keeping every image, repeats and image count when trimming) so that images x repeats ≈ target.

    The guide's multi-concept example: 20, 33, 100, 50 images with target 100 give 5, 3, 1, 2 repeats; from 23, 49,
    100, 79 images it trims to 20 x 5, 33 x 3, 100 x 1, 50 x 2.
    """
    if images < 1 or target < 1:
        raise ValueError(f"images and target must be >= 1, got {images}, {target}")
    trim_repeats = math.ceil(target / images)
    return max(1, round(target / images)), trim_repeats, min(images, round(target / trim_repeats))


def plan_folders(scan: Scan, target: int = DEFAULT_EXPOSURE) -> list[FolderPlan]:
    """A FolderPlan per subset with images (empty folders are left out: nothing of them trains)."""
    plans = []
    for subset in scan.subsets:
        if subset.items:
            suggested, trim_repeats, trim_images = suggest_repeats(len(subset.items), target)
            name = subset.root.name
            plans.append(FolderPlan(name, len(subset.items), subset.repeats, suggested, trim_repeats, trim_images))
    return plans
