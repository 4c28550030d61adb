"""Concepts: one small YAML per thing to train (a character, a style, an outfit), and the Makefile's helpers.

A concept names its dataset folder(s), trigger words, the finetune preset and overrides, and the ranks to extract
and resize to (``concepts/example.yaml`` documents every key). ``make finetune extract resize CONCEPT=kafka`` runs
``concepts/kafka.yaml`` into ``runs/kafka/``; ``xlbake batch`` runs many.

The Makefile calls this module at parse time (``python -m xlbake.batch.concepts ...``):

- ``make-vars CONCEPT --out RUN/.concept.mk`` writes the concept as make variables (the finetune arguments,
  ``DIM``, ``CONV_DIM``, ``RANK``, ``SIZE``, ``EXTRACT_ARGS``, ``RESIZE_ARGS``); variables given on make's command
  line still win.
- ``stamp RUN/.finetune.config [--check] -- python -m finetune ... --dry-run`` decides what the finetune of RUN
  has to do (``finetune_action``): nothing, resume, or start; with ``--check`` it only prints that (make -n / -q
  change nothing), else it stores the resolved config plus a digest of the dataset files as the stamp (rewritten
  only when that content changed) and prints the finetune's flags. A finished or started run is never started
  over with another config or data unless ``--force``; the refusal lists what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from xlbake.batch.run_folder import RESOLVED_CONFIG, STATE, TUNED_FP32
from xlbake.cli import run_guarded
from xlbake.config import load_config
from xlbake.config_values import flatten
from xlbake.errors import ConfigError, InputError, OutputError

CONCEPT_VERSION = 1
CONCEPTS_DIR = Path("concepts")
TEMP_PREFIX = ".xlbake-tmp-"  # the prefix xlbake.fileio.remove_stale_temps cleans up
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"
BUILTIN_PREFIX = "builtin:"
CONCEPT_SUFFIXES = (".yaml", ".yml")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SIZE_PATTERN = re.compile(r"^[0-9.]+(e[0-9]+)?[A-Za-z]*$")
# finetune keys a concept may not override: the chain sets them (run_dir from RUN, data.roots from datasets)
RESERVED_KEYS = {
    "run_dir": "the run folder is RUN (runs/<concept>)",
    "data.roots": "list the folders in datasets",
    "data.triggers": "list the words in triggers",
}
FINETUNE_FLAGS = {"start": "--force", "resume": "--resume auto"}
MAX_LISTED_CHANGES = 8
# stage flags the chain sets itself, so they may not appear in extract_args / resize_args
CHAIN_FLAGS = {
    "extract_args": ("--base", "--tuned", "--out", "--dim", "--conv-dim", "--force", "--config", "--dry-run"),
    "resize_args": ("--lora", "--out", "--rank", "--size", "--force", "--config", "--dry-run"),
}


@dataclass(frozen=True)
class ConceptConfig:
    """One concept: what to train on, with which preset, and which LoRA files to make from the finetune."""

    datasets: tuple[Path, ...]
    """Dataset folder(s) in kohya layout (`N_name` subfolders of images and captions; N = repeats); relative paths
    are resolved against the concept file. `builtin:demo` is the built-in demo dataset."""
    preset: str
    """Finetune preset: a name from configs/finetune/ (e.g. `a100-80gb`, `tiny-cpu`) or a path to a finetune YAML,
    relative to the concept file."""
    config_version: int = CONCEPT_VERSION
    """Version of the concept format."""
    triggers: tuple[str, ...] = ()
    """Trigger words of the concept (e.g. [kafka]); shown in the batch summary and written into every checkpoint and
    LoRA (modelspec.trigger_phrase, which UIs and CivitAI show)."""
    add_triggers: bool = False
    """Put the trigger words first in every caption (finetune caption.prefix); for captions that lack them."""
    overrides: tuple[str, ...] = ()
    """Finetune config overrides as KEY=VALUE (values parsed as YAML), applied after the preset, e.g.
    `train.epochs=50`. run_dir and data.roots are set by the chain."""
    dim: tuple[int, ...] = (128,)
    """Rank(s) to extract (make's DIM): one file RUN/lora-dim{D}.safetensors each."""
    conv_dim: int = 0
    """3x3 conv rank of the extraction (LoCon, make's CONV_DIM); 0 = no conv layers."""
    rank: tuple[int, ...] = (16,)
    """Rank(s) to resize every extracted file to (make's RANK): RUN/lora-dim{D}-rank{R}.safetensors each."""
    size: tuple[str, ...] = ()
    """Size budgets to resize every extracted file to (make's SIZE), e.g. [100MB]: RUN/lora-dim{D}-{SIZE}."""
    extract_args: tuple[str, ...] = ()
    """Extra `python -m extract` flags, e.g. [--svd, exact]."""
    resize_args: tuple[str, ...] = ()
    """Extra `python -m resize` flags, e.g. [--save-precision, bf16]."""

    def __post_init__(self) -> None:
        problems = []
        if not self.datasets:
            problems.append("datasets: give at least one dataset folder")
        if not self.preset.strip():
            problems.append("preset: give a preset name (configs/finetune/<name>.yaml) or a path")
        if any(not t.strip() or "\n" in t for t in self.triggers):
            problems.append("triggers: each trigger must be a non-empty single line")
        if self.add_triggers and not self.triggers:
            problems.append("add_triggers: needs at least one word in triggers")
        problems += [_override_problem(i, text) for i, text in enumerate(self.overrides)]
        if not self.dim or min(self.dim) < 1 or not self.rank or min(self.rank) < 1:
            problems.append(f"dim, rank: ranks must be >= 1, got dim {list(self.dim)}, rank {list(self.rank)}")
        if self.conv_dim < 0:
            problems.append(f"conv_dim: must be >= 0 (0 = no conv layers), got {self.conv_dim}")
        problems += [f"size: {s!r} is not a budget like 100MB or 50M" for s in self.size if not SIZE_PATTERN.match(s)]
        for key, flags in CHAIN_FLAGS.items():
            for arg in getattr(self, key):
                if arg.split("=")[0] in flags or "\n" in arg:
                    problems.append(f"{key}: {arg.split('=')[0]!r} is set by the chain; use the concept's keys")
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError("; ".join(problems))


def _override_problem(index: int, text: str) -> str:
    key, sep, _ = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")) or "\n" in text:
        return f"overrides[{index}]: expected KEY=VALUE with a dotted key (e.g. train.epochs=50), got {text!r}"
    if key in RESERVED_KEYS:
        return f"overrides[{index}]: {key} is set by the chain; {RESERVED_KEYS[key]}"
    return ""


@dataclass(frozen=True)
class Concept:
    """A loaded, checked concept: its name (the file's stem, also the run folder's name), file and config."""

    name: str
    path: Path
    config: ConceptConfig
    preset: Path  # the finetune YAML the preset names

    def finetune_args(self) -> list[str]:
        """``python -m finetune`` arguments for this concept, before make's own ``--set run_dir=RUN``."""
        cfg = self.config
        args = ["--config", str(self.preset), "--set", "data.roots=" + json.dumps([str(p) for p in cfg.datasets])]
        if cfg.triggers:  # recorded in every checkpoint and LoRA (modelspec.trigger_phrase)
            args += ["--set", "data.triggers=" + json.dumps([t.strip() for t in cfg.triggers])]
        if cfg.add_triggers:
            args += ["--set", "caption.prefix=" + json.dumps(", ".join(t.strip() for t in cfg.triggers) + ",")]
        for override in cfg.overrides:
            args += ["--set", override]
        return args

    def make_vars(self) -> str:
        """The concept as make variable assignments (a makefile fragment for ``include``)."""
        cfg = self.config
        values = {
            "CONCEPT_NAME": [self.name],
            "CONCEPT_FINETUNE_ARGS": self.finetune_args(),
            "DIM": [str(d) for d in cfg.dim],
            "CONV_DIM": [str(cfg.conv_dim)],
            "RANK": [str(r) for r in cfg.rank],
            "SIZE": list(cfg.size),
            "EXTRACT_ARGS": list(cfg.extract_args),
            "RESIZE_ARGS": list(cfg.resize_args),
        }
        lines = [f"# Generated from {self.path} by python -m xlbake.batch.concepts make-vars; edit the concept."]
        for name, words in values.items():
            lines.append(f"{name} := {' '.join(_make_word(word) for word in words)}".rstrip())
        return "\n".join(lines) + "\n"


def _make_word(word: str) -> str:
    """One shell word, quoted for the shell and escaped for a make variable (``$`` and ``#`` are special there)."""
    return shlex.quote(word).replace("$", "$$").replace("#", "\\#")


def concept_path(spec: str | os.PathLike, concepts_dir: Path = CONCEPTS_DIR) -> Path:
    """``kafka`` -> ``concepts/kafka.yaml``; a path (with a folder or a .yaml suffix) is taken as it is."""
    text = str(spec)
    if "/" in text or os.sep in text or text.endswith(CONCEPT_SUFFIXES):
        return Path(text)
    return Path(concepts_dir) / f"{text}.yaml"


def list_concepts(concepts_dir: Path = CONCEPTS_DIR) -> list[Path]:
    """Every concept file in ``concepts_dir``, sorted by name."""
    folder = Path(concepts_dir)
    return sorted(p for p in folder.iterdir() if p.suffix in CONCEPT_SUFFIXES) if folder.is_dir() else []


def load_concept(spec: str | os.PathLike, concepts_dir: Path = CONCEPTS_DIR) -> Concept:
    """Load and check a concept by name or path; one ``ConfigError`` lists every problem (file:key: what to do)."""
    path = concept_path(spec, concepts_dir)
    if not path.is_file():
        known = ", ".join(p.stem for p in list_concepts(path.parent)) or "none"
        raise ConfigError(f"{path}: no such concept file; concepts in {path.parent}: {known}")
    name = path.stem
    cfg = load_config(ConceptConfig, path)
    problems = [] if NAME_PATTERN.match(name) else [f"{path}: the name {name!r} must be letters, digits, . _ -"]
    for index, folder in enumerate(cfg.datasets):
        if not folder.name.startswith(BUILTIN_PREFIX) and not folder.is_dir():
            problems.append(f"{path}: datasets[{index}]: {folder} is not a folder; fix the path (relative to {path})")
    preset = _preset_path(cfg.preset, path)
    if not preset.is_file():
        known = ", ".join(p.stem for p in sorted(PRESETS_DIR.glob("*.yaml"))) or "none"
        problems.append(f"{path}: preset: {preset} does not exist; use a name ({known}) or a finetune YAML path")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "\n".join(problems))
    return Concept(name, path, cfg, preset)


def _preset_path(preset: str, concept_file: Path) -> Path:
    if "/" in preset or preset.endswith(CONCEPT_SUFFIXES):
        return (concept_file.parent / preset).resolve()
    return PRESETS_DIR / f"{preset}.yaml"


def dataset_digest(roots: Iterable[Path]) -> list[str]:
    """One line per dataset root: sha256 over its files' relative paths, sizes and mtimes, and the file count."""
    lines = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            lines.append(f"# dataset {root}: missing")
            continue
        digest, count = hashlib.sha256(), 0
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()
            digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
        lines.append(f"# dataset {root}: {count} files, sha256 {digest.hexdigest()}")
    return lines


def stamp_text(resolved_yaml: str) -> str:
    """The finetune stamp: the resolved config, then a digest line for each dataset root / dataset TOML in it."""
    try:
        data = yaml.safe_load(resolved_yaml) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"the finetune --dry-run output is not YAML ({exc}); check the finetune command") from None
    section = data.get("data") if isinstance(data, Mapping) else None
    section = section if isinstance(section, Mapping) else {}
    roots = [Path(r) for r in section.get("roots") or []]
    if section.get("dataset_toml"):
        roots.append(Path(section["dataset_toml"]))
    return resolved_yaml.rstrip("\n") + "\n" + "".join(line + "\n" for line in dataset_digest(roots))


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless it already holds exactly that; True when written.

    Make calls this on every run, so it stays light: a temp file beside ``path``, fsync, rename (the protocol of
    ``xlbake.fileio``, which imports torch, seconds per call).
    """
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror}); check the run folder's permissions") from None
    return True


@click.group(name="xlbake.batch.concepts", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Helpers the Makefile calls for concepts and stage stamps."""


@cli.command(name="make-vars")
@click.argument("concept")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Makefile fragment.")
@run_guarded
def make_vars_command(concept: str, out: Path) -> None:
    """Write CONCEPT (a name in concepts/ or a path) as make variables to OUT (only when they changed)."""
    write_if_changed(out, load_concept(concept).make_vars())


def stamp_changes(old: str, new: str, *, with_data: bool = True) -> list[str]:
    """What differs between two finetune stamps: ``key: old -> new`` per dotted config key, then the datasets."""
    old_cfg, new_cfg = _flat_yaml(old), _flat_yaml(new)
    changes = [
        f"{key}: {old_cfg.get(key, '(unset)')} -> {new_cfg.get(key, '(unset)')}"
        for key in sorted(old_cfg.keys() | new_cfg.keys())
        if old_cfg.get(key) != new_cfg.get(key)
    ]
    if with_data:
        old_data = {line.rpartition(": ")[0]: line for line in old.splitlines() if line.startswith("# dataset ")}
        for line in new.splitlines():
            root = line.rpartition(": ")[0]
            if line.startswith("# dataset ") and old_data.get(root) != line:
                changes.append(f"{root.removeprefix('# ')} changed")
    return changes


def _flat_yaml(text: str) -> dict[str, object]:
    """A YAML mapping as {"dotted.key": value}; an unreadable text as no keys (every key then differs)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return flatten(data) if isinstance(data, Mapping) else {}


def finetune_action(
    stamp: Path, dry_run: Callable[[], str], *, extract_only: bool, as_recorded: bool, force: bool
) -> tuple[str, str]:
    """What the finetune of ``stamp``'s run folder does: ("done" | "resume" | "start", the stamp it runs with).

    The stamp holds the config and data the run was started with, written just before the finetune starts, so the
    run is finished when its tuned file is at least as new. ``dry_run`` gives the wanted config (run only if needed).
    ``extract_only``: the finetune may not run (make extract/resize): it must be finished, and with a config given
    (not ``as_recorded``) it must be that one. Starting over a finished or started run needs ``force``.
    """
    run, tuned = stamp.parent, stamp.parent / TUNED_FP32
    record = stamp if stamp.exists() else run / RESOLVED_CONFIG
    finished = tuned.exists() and (not record.exists() or tuned.stat().st_mtime_ns >= record.stat().st_mtime_ns)
    started = finished or (run / STATE).is_dir()
    if extract_only and not finished:
        if started or tuned.exists():
            raise InputError(f"{run}: its finetune has not finished; finish it first: make finetune RUN={run}")
        raise InputError(
            f"{run}: no finetune here (no {TUNED_FP32}); run the finetune first: "
            f'make finetune RUN={run} CONFIG=<preset> SET="data.roots=[<dataset>]" (or CONCEPT=<name>)'
        )
    if extract_only and as_recorded:
        return "done", ""
    wanted = stamp_text(dry_run())
    old = record.read_text(encoding="utf-8") if record.exists() else ""
    changes = stamp_changes(old, wanted, with_data=record == stamp)
    if not changes:
        return ("done" if finished else "resume" if (run / STATE).is_dir() else "start"), wanted
    if started and (extract_only or not force):
        listed = "; ".join(changes[:MAX_LISTED_CHANGES]) + (" ..." if len(changes) > MAX_LISTED_CHANGES else "")
        what = "a finished finetune" if finished else "a started finetune (its state)"
        todo = (
            "extract from it as it is: leave out CONFIG/CONCEPT/SET; or retrain: make finetune ... FORCE=1"
            if extract_only
            else "retrain over it: FORCE=1; or choose another RUN"
        )
        raise InputError(f"{run}: holds {what} made with another config or data ({listed}); to {todo}")
    return "start", wanted


@cli.command(name="stamp", context_settings={"ignore_unknown_options": True})
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Only print the action (done, resume, start); write nothing.")
@click.option("--extract-only", is_flag=True, help="The finetune may not run: it must be finished.")
@click.option("--as-recorded", is_flag=True, help="COMMAND is the run's own recorded config, unchanged.")
@click.option("--force", is_flag=True, help="Start over a finished or started run whose config or data changed.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@run_guarded
def stamp_command(
    out: Path, check: bool, extract_only: bool, as_recorded: bool, force: bool, command: Sequence[str]
) -> None:
    """Decide the finetune of OUT's run from COMMAND (a finetune --dry-run); store the stamp, print its flags."""

    def dry_run() -> str:
        result = subprocess.run(list(command), stdout=subprocess.PIPE, text=True, check=False)
        if result.returncode != 0:
            raise click.exceptions.Exit(result.returncode)
        return result.stdout

    action, wanted = finetune_action(out, dry_run, extract_only=extract_only, as_recorded=as_recorded, force=force)
    if check:
        click.echo(action)
        return
    existed = out.exists()
    if action == "start" and write_if_changed(out, wanted) and existed:
        click.echo(f"{out}: the resolved finetune config or the dataset changed; the finetune starts over", err=True)
    click.echo(FINETUNE_FLAGS.get(action, ""))


if __name__ == "__main__":
    sys.exit(cli(prog_name="python -m xlbake.batch.concepts"))
