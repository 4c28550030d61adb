"""Training state for --resume: accelerate's ``save_state`` plus our own JSON and the EMA weights.

A state folder ``RUN/state/step-00000123/`` holds accelerate's files (trained weights, optimizer, scheduler,
gradient scaler, RNG states), ``trainer_state.json`` (step, epoch, position in the epoch, sampler state, our
generator's state, loss history, the resolved config) and ``ema.safetensors``. It is written beside its final
name and renamed into place, so a crash leaves the previous states intact; only the newest ``keep`` are kept. A
step saved again (a scheduled save, then SIGTERM's) renames the older folder aside to ``step-N.replaced`` before
the new one goes in and deletes it after, so a kill at any point leaves a complete state of that step.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xlbake.batch.run_folder import STATE_FILE, STEP_PREFIX, step_tag
from xlbake.config_values import flatten
from xlbake.errors import InputError, TrainingError
from xlbake.fileio import TEMP_PREFIX

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
REPLACED_SUFFIX = ".replaced"
"""An older state of the same step, renamed aside while its successor is renamed into place."""
RESUME_FREE_KEYS = (
    "run_dir",
    "log.",
    "sample.",
    "checkpoint.keep_last",
    "checkpoint.keep_states",
    "train.num_workers",
    "train.max_steps",
    "train.epochs",
)
"""Config keys that may change between a run and its resume (everything else must match); raising the last two
trains a finished run further."""


@dataclass
class TrainerState:
    """Our part of the training state (accelerate saves the rest)."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # batches of `epoch` already consumed
    sampler: dict[str, Any] = field(default_factory=dict)
    generator: str = ""  # base64 of the training generator's state (noise, timesteps, VAE sampling)
    generators: list[str] = field(default_factory=list)  # every process's generator state, by rank (several)
    nan_skips: int = 0  # optimizer steps skipped in a row for a non-finite loss
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    lrs: list[float] = field(default_factory=list)  # first param group's LR at each optimizer step
    train_seconds: float = 0.0  # wall time spent in Trainer.train over the whole run, resumes included
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def encode_generator(generator: torch.Generator) -> str:
    """A generator's state as base64 text."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def decode_generator(generator: torch.Generator, text: str) -> None:
    """Restore a generator from ``encode_generator`` text."""
    data = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    generator.set_state(data)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring ``RESUME_FREE_KEYS``."""
    old, new = flatten(saved), flatten(current)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and not k.startswith(RESUME_FREE_KEYS)]


def state_dirs(root: Path) -> list[Path]:
    """Complete state folders under ``root``, oldest first: one per step, ``step-N`` or else its ``.replaced``
    copy (a re-save of that step killed between its two renames)."""
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir(), key=lambda p: not p.name.endswith(REPLACED_SUFFIX)):  # asides first
        step = path.name.removesuffix(REPLACED_SUFFIX).removeprefix(STEP_PREFIX)
        if path.name.startswith(STEP_PREFIX) and step.isdigit() and (path / STATE_FILE).is_file():
            found[int(step)] = path  # the step's own folder, listed last, wins over its aside copy
    return [found[step] for step in sorted(found)]


def find_resume(root: Path, resume: str) -> Path | None:
    """The state folder to resume: ``auto`` = newest under ``root`` (None if there is none), else a given path."""
    if resume == "auto":
        found = state_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise InputError(f"{path}: not a training state folder (no {STATE_FILE}); use --resume auto or a RUN/state/*")
    return path


def is_finished(state: TrainerState, max_steps: int, epochs: int) -> bool:
    """True when a run at ``state`` has done ``max_steps`` optimizer steps (0: no limit) or ``epochs`` epochs."""
    return (max_steps > 0 and state.global_step >= max_steps) or state.epoch >= epochs


def check_resume(root: Path, resume: str, config: Mapping[str, Any], config_hash: str) -> Path | None:
    """The state folder to resume (``find_resume``), refused naming the differing keys if it was trained with
    another config. Reads only its JSON, so that a mismatch is reported before anything is loaded or written."""
    folder = find_resume(root, resume)
    if folder is not None:
        _check_config(folder, read_trainer_state(folder), config, config_hash)
    return folder


def write_state(
    root: Path,
    state: TrainerState,
    save_accelerate: Any,
    ema_tensors: Mapping[str, torch.Tensor],
    keep: int,
    *,
    main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a state folder atomically and prune old ones; ``save_accelerate(folder)`` writes accelerate's files.

    With several processes every one calls this (``barrier`` waits for all of them): each writes its own files
    (accelerate's RNG states, DeepSpeed's optimizer shards) into one staging folder; only the ``main`` process
    writes ours, renames the folder into place and prunes.
    """
    final = root / step_tag(state.global_step)
    staging = root / f"{TEMP_PREFIX}{final.name}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _clean_up(root)
        staging.mkdir()
    barrier()
    try:
        save_accelerate(staging)
        barrier()
        if main:
            if ema_tensors:
                tensors = {k: v.detach().contiguous().cpu() for k, v in ema_tensors.items()}
                save_file(tensors, str(staging / EMA_FILE))
            (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
            _fsync_tree(staging)
            _move_into_place(staging, final)
    except (OSError, SafetensorError) as exc:  # safetensors reports its own write failures (e.g. file too large)
        raise TrainingError(f"{final}: cannot save training state ({_describe(exc)}); free disk space") from exc
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
    if main:
        for old in state_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_state(
    folder: Path, config: Mapping[str, Any], config_hash: str
) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """Read our state and EMA tensors; TrainingError naming the differing keys if the config does not match."""
    state = read_trainer_state(folder)
    _check_config(folder, state, config, config_hash)
    ema_file = folder / EMA_FILE
    ema = load_file(str(ema_file)) if ema_file.exists() else {}
    return state, ema


def read_trainer_state(folder: Path) -> TrainerState:
    """Our JSON of a state folder (InputError if unreadable)."""
    try:
        return TrainerState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"{folder / STATE_FILE}: unreadable training state ({exc}); resume from another state"
        ) from exc


def _check_config(folder: Path, state: TrainerState, config: Mapping[str, Any], config_hash: str) -> None:
    if state.config_hash == config_hash:
        return
    differing = config_differences(state.config, config)
    if differing:
        shown = ", ".join(differing[:8]) + (" ..." if len(differing) > 8 else "")
        raise TrainingError(
            f"{folder}: the config differs from the one this state was trained with ({shown}); "
            "use the run's config.resolved.yaml or start a new run"
        )


def _clean_up(root: Path) -> None:
    """Remove what killed saves left: staging folders, and older states whose successor is in place (one whose
    successor never arrived goes back under its own name)."""
    for stale in root.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(f"{STEP_PREFIX}*{REPLACED_SUFFIX}"):
        final = aside.with_name(aside.name.removesuffix(REPLACED_SUFFIX))
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` is renamed aside first and deleted last."""
    aside = final.with_name(final.name + REPLACED_SUFFIX)
    if final.exists():
        os.replace(final, aside)
    try:
        os.replace(staging, final)
    except OSError:
        if aside.exists():
            os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _describe(exc: OSError | SafetensorError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
