"""Parse a kohya sd-scripts dataset TOML (``[[datasets]]`` / ``[[datasets.subsets]]``) into subset settings.

Only the settings: which folder, repeats, class tokens, caption extension and caption options each subset has, and
notes on the keys and subsets that have no effect here. Reading the folders is ``xlbake.data.kohya``'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlbake.errors import InputError

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
    "resolution": "set data.resolution in the training config",
    "batch_size": "set train.batch_size in the training config",
    "enable_bucket": "xlbake always buckets by aspect ratio",
    "min_bucket_reso": "set data.min_bucket_reso in the training config",
    "max_bucket_reso": "set data.max_bucket_reso in the training config",
    "bucket_reso_steps": "set data.bucket_step in the training config",
    "bucket_no_upscale": "set data.no_upscale in the training config",
    "flip_aug": "set data.flip in the training config",
    "random_crop": "set data.random_crop in the training config",
}
"""kohya TOML training keys that our config sets for the whole run instead -> what to do."""


@dataclass(frozen=True)
class TomlSubset:
    """One ``[[datasets.subsets]]`` with its values merged from the dataset and ``[general]``."""

    folder: Path
    repeats: int
    class_tokens: str | None
    caption_extension: str | None
    caption_options: tuple[tuple[str, Any], ...]
    """(caption-config field, value) pairs."""


@dataclass(frozen=True)
class TomlDataset:
    subsets: tuple[TomlSubset, ...]
    notes: tuple[tuple[str, str], ...]
    """(kind, message): "unsupported_subset" or "ignored_key" findings (see xlbake.data.kohya.PROBLEM_KINDS)."""


def parse_toml(path: Path) -> TomlDataset:
    """The subsets of a kohya dataset TOML; values fall back subset -> dataset -> ``[general]``, as in kohya.
    Relative image_dir paths are resolved against the TOML's folder. InputError when the file cannot be read, an
    image_dir is missing or a value has the wrong type."""
    data = _load_toml(path)
    general = data.get("general", {})
    subsets, notes = [], []
    _note_ignored_keys("general", general, notes)
    for d, dataset in enumerate(data.get("datasets", [])):
        _note_ignored_keys(f"datasets[{d}]", dataset, notes)
        for s, raw in enumerate(dataset.get("subsets", [])):
            where = f"datasets[{d}].subsets[{s}]"
            _note_ignored_keys(where, raw, notes)
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **raw}
            subset = _toml_subset(path, where, merged, notes)
            if subset is not None:
                subsets.append(subset)
    return TomlDataset(tuple(subsets), tuple(notes))


def _toml_subset(toml: Path, where: str, values: Mapping[str, Any], notes: list) -> TomlSubset | None:
    if "image_dir" not in values:
        notes.append(
            ("unsupported_subset", f"{where}: no image_dir (metadata_file subsets are not supported): skipped")
        )
        return None
    if values.get("is_reg", False):
        notes.append(("unsupported_subset", f"{where}: regularization images are not used: skipped"))
        return None
    folder = Path(values["image_dir"])
    folder = folder if folder.is_absolute() else toml.parent / folder
    if not folder.is_dir():
        raise InputError(f"{toml}: {where}.image_dir {folder} is not a folder; fix the path in the TOML")
    repeats = values.get("num_repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"{toml}: {where}.num_repeats must be an integer >= 1, got {repeats!r}")
    options = []
    for key, (field, kind) in TOML_CAPTION_KEYS.items():
        if key in values:
            value = values[key]
            if not _has_type(value, kind):
                raise InputError(f"{toml}: {where}.{key} must be {kind.__name__}, got {value!r}; fix the TOML")
            options.append((field, float(value) if kind is float else value))
    return TomlSubset(folder, repeats, values.get("class_tokens"), values.get("caption_extension"), tuple(options))


def _note_ignored_keys(where: str, table: Mapping[str, Any], notes: list) -> None:
    for key in table:
        if key in TOML_SUBSET_KEYS or key in ("subsets", "datasets"):
            continue
        notes.append(("ignored_key", f"{where}.{key}: ignored ({TOML_TRAINING_KEYS.get(key, 'not used')})"))


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
