"""Weights files read and written one tensor at a time: peak memory stays at about one tensor.

A safetensors file is read with positioned file reads into a fresh buffer (or piece by piece into a reused one),
not through a memory map (which is what ``safetensors.safe_open`` does): pages of a mapped file stay counted in
the process's resident memory once touched, so reading every tensor of a 7 GB checkpoint would look like a 7 GB
peak (measured on a 192 MiB file of 4 MiB tensors: +206 MiB peak RSS through one ``safe_open``, +17-20 MiB with
these reads). Opening ``safe_open`` anew for each tensor keeps the peak low but parses the header every time
(+9 s over an SDXL-sized header of 2600 tensors). The header is parsed and checked against the file size once,
so a truncated or corrupt file is refused, with what is wrong, before any tensor is read. Pickles are only ever
loaded weights-only, and only on an explicit opt-in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from xlbake.errors import InputError, OutputError
from xlbake.fileio import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 << 20
HASH_CHUNK = 1 << 20
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

Spec = tuple[torch.dtype, tuple[int, ...]]


class SafetensorsFile:
    """A safetensors file read tensor by tensor (header parsed and checked against the file size once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.specs, self.offsets, self.metadata = _read_header(path)
        self._handle: BinaryIO | None = None

    def read(self, name: str) -> Tensor:
        dtype, shape = self.specs[name]
        start, end = self.offsets[name]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        self._read_into(name, start, buffer)
        return buffer.view(dtype).reshape(shape)

    def read_pieces(self, name: str, scratch: Tensor) -> Iterator[Tensor]:
        """``name`` flattened, in consecutive pieces of whole elements read into ``scratch`` (uint8): each piece
        is a view of it, valid until the next is read. Converting a tensor piece by piece from a small reused
        buffer spares a fresh buffer of the whole tensor, whose pages each fault on first touch."""
        dtype = self.specs[name][0]
        start, end = self.offsets[name]
        step = max(dtype.itemsize, scratch.numel() // dtype.itemsize * dtype.itemsize)
        for offset in range(start, end, step):
            piece = scratch[: min(step, end - offset)]
            self._read_into(name, offset, piece)
            yield piece.view(dtype)

    def _read_into(self, name: str, offset: int, buffer: Tensor) -> None:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 (kept open across reads, closed by close())
        self._handle.seek(offset)
        if buffer.numel() and self._handle.readinto(memoryview(buffer.numpy())) != buffer.numel():
            raise InputError(f"{self.path}: file ended while reading {name}; the file is truncated, re-download it")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class PickleFile:
    """A pickle checkpoint loaded with ``torch.load(weights_only=True)`` (explicit opt-in only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle; all mean "cannot use this file"
            raise InputError(
                f"{path}: cannot load as a weights-only pickle ({type(exc).__name__}); use safetensors"
            ) from exc
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise InputError(f"{path}: pickle holds no state dict; use a safetensors checkpoint")
        self.tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        self.specs = {k: (v.dtype, tuple(v.shape)) for k, v in self.tensors.items()}
        self.metadata: dict[str, str] = {}

    def read(self, name: str) -> Tensor:
        return self.tensors[name].clone()  # the caller's own tensor, as from a safetensors file (it may work in place)

    def close(self) -> None:
        self.tensors = {}


def _read_header(path: Path) -> tuple[dict[str, Spec], dict[str, tuple[int, int]], dict[str, str]]:
    """Parse and check a safetensors header: (name -> (dtype, shape), name -> absolute byte range, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            raw = handle.read(length) if 2 <= length <= min(MAX_HEADER_BYTES, size - 8) else None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}); check the path and its permissions") from exc
    if raw is None:
        raise InputError(f"{path}: not a safetensors file (bad header length); is it truncated or another format?")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a safetensors file (header is not JSON); is it truncated?") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    specs, offsets, data_end = {}, {}, 0
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: tensor {name} has an invalid or unsupported header entry ({exc})") from exc
        if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
            raise InputError(f"{path}: tensor {name} has inconsistent offsets in the header; the file is corrupt")
        specs[name], offsets[name] = (dtype, shape), (8 + length + start, 8 + length + end)
        data_end = max(data_end, end)
    if 8 + length + data_end > size:
        raise InputError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + length + data_end}); "
            "re-download or re-save it"
        )
    return specs, offsets, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, Spec],
    fetch: Callable[[str], Tensor],
    *,
    metadata: Mapping[str, str],
    force: bool = False,
) -> Path:
    """Write a safetensors file from ``specs`` (name -> (dtype, shape)), calling ``fetch(name)`` one tensor at a time.

    The header is written first, then each tensor (cast to its spec dtype) in name order: memory stays at one
    tensor. Atomic (temp + rename); OutputError if a fetched tensor's shape differs from its spec.
    """
    path = Path(path)
    with atomic_path(path, force) as tmp, open(tmp, "wb") as out:
        stream_safetensors(out, path, specs, fetch, metadata=metadata)
    return path


def stream_safetensors(
    out: BinaryIO, path: Path, specs: Mapping[str, Spec], fetch: Callable[[str], Tensor], *, metadata: Mapping[str, str]
) -> str:
    """The body of :func:`write_safetensors`, into an open file (``path`` names the output in errors); returns the
    sha256 hex digest of the data section (kohya's ``sshs_model_hash``), hashed as it is written."""
    digest = hashlib.sha256()
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write(len(encoded).to_bytes(8, "little") + encoded)
    for name in sorted(specs):
        dtype, shape = specs[name]
        tensor = fetch(name).detach().to("cpu", dtype).contiguous()
        if tuple(tensor.shape) != tuple(shape):
            raise OutputError(f"{path}: tensor {name} changed shape while writing; nothing was written")
        if tensor.numel():
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            out.write(data)
            digest.update(data)
    return digest.hexdigest()


def replace_in_header(path: Path, placeholder: str, value: str) -> None:
    """Replace ``placeholder`` in a safetensors file's header by ``value`` of the same length, in place (the header
    keeps its size, the data does not move); OutputError unless it occurs exactly once."""
    with open(path, "r+b") as handle:
        header = handle.read(8 + int.from_bytes(handle.read(8), "little"))
        if header.count(placeholder.encode()) != 1:
            raise OutputError(f"{path}: metadata must not contain {placeholder!r}; remove that value")
        handle.seek(8 + header.index(placeholder.encode()))
        handle.write(value.encode())


def safetensors_data_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of a safetensors file's bytes after the header (kohya's ``sshs_model_hash``)."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_len)
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
