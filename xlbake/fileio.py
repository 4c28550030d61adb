"""Atomic, never-overwriting output files.

Every output is written to a temp file in the destination folder, flushed and fsynced, then renamed over the
final name, so a crash (even kill -9) leaves either the old file or the new one, never half of one. An existing
output is kept unless the caller passes ``force``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from xlbake.errors import OutputError

if TYPE_CHECKING:  # torch is imported only when tensors are saved, so text writers (make stamps) start fast
    import torch

TEMP_PREFIX = ".xlbake-tmp-"


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Check that ``path`` may be written: refuse an existing file without ``force`` and an unwritable folder.

    Creates the parent folder if missing. Call this before expensive work so a typo costs nothing.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path}: output exists; pass --force to overwrite it or choose another --out")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the output")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create output folder ({exc.strerror}); choose a writable path") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output folder is not writable; choose a writable path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync and rename it to ``path``, on failure remove it.

    >>> with atomic_path("out.safetensors", force=True) as tmp:
    ...     save_file(tensors, tmp)
    """
    path = check_output(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        if path.exists() and not force:  # created by someone else while we worked
            raise OutputError(f"{path}: output appeared while writing; pass --force to overwrite it")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as exc:  # safetensors reports its own write failures (e.g. file too large)
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({_describe(exc)}); free space or choose another path") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    """Write a text file atomically."""
    with atomic_path(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """Write a binary file atomically."""
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Save tensors as a safetensors file atomically. Metadata values must be strings."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    with atomic_path(path, force) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed writer left in ``folder``; return what was removed."""
    removed = []
    for stale in Path(folder).glob(f"{TEMP_PREFIX}*"):
        if stale.is_dir() and not stale.is_symlink():  # staging folders of state and diffusers saves
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe(exc: OSError | SafetensorError) -> str:
    if not isinstance(exc, OSError):
        return " ".join(str(exc).split())
    if exc.errno == errno.ENOSPC:
        return "disk full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return exc.strerror or str(exc)
