"""Starting a run folder: refuse one that cannot be used (before anything is loaded or written), then clear what a
``--force`` start replaces and write ``config.resolved.yaml``. Its names: ``xlbake.batch.run_folder``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from xlbake.batch.run_folder import (
    CHECKPOINTS,
    DIFFUSERS_DIR,
    LOGS,
    RESOLVED_CONFIG,
    SAFETENSORS,
    SAMPLES,
    STATE,
    TUNED_PREFIX,
)
from xlbake.errors import OutputError
from xlbake.fileio import write_text_atomic


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> Path:
    """Refuse, writing nothing, a run folder that cannot be used: a non-empty one needs ``resume`` or ``force``;
    it (or, if missing, the nearest existing folder above it) must be a writable folder."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (resume or force):
        raise OutputError(
            f"{run_dir}: run folder is not empty; pass --resume auto to continue it, --force to start over, "
            "or choose another run_dir"
        )
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{run_dir}: cannot create the run folder ({existing} is a file); choose a writable run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{run_dir}: {existing} is not writable; choose a writable run_dir")
    return run_dir


def check_restart(run_dir: Path) -> None:
    """Refuse, writing nothing, to train from step 0 over the model outputs of a run folder (``--resume auto``
    that found no training state, e.g. after a run with checkpoint.save_state false)."""
    run_dir = Path(run_dir)
    outputs = sorted(run_dir.glob(f"{TUNED_PREFIX}*")) + sorted((run_dir / CHECKPOINTS).glob(f"*{SAFETENSORS}"))
    if outputs:
        raise OutputError(
            f"{run_dir}: no training state to resume in {run_dir / STATE}, and resuming would train from step 0 "
            f"over {outputs[0]}; pass --force to start over, or choose another run_dir"
        )


def prepare_run_dir(cfg: Any, resume: bool, force: bool) -> Path:
    """Start the run folder (after ``check_run_dir``) and write ``config.resolved.yaml``.

    ``force`` without ``resume`` starts over: this run's state, checkpoints, samples and logs are removed.
    """
    from xlbake.config import dump_yaml

    run_dir = check_run_dir(Path(cfg.run_dir), resume, force)
    if force and not resume:
        for name in (STATE, CHECKPOINTS, SAMPLES, LOGS, DIFFUSERS_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    write_text_atomic(run_dir / RESOLVED_CONFIG, dump_yaml(cfg), force=True)
    return run_dir
