"""A cheap fingerprint of a checkpoint, recorded in what is made from it (extract's LoRA header) and compared by
``xlbake batch`` to find LoRAs made from an earlier finetune than the one now in the run folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_SCHEME = "xlbake-fp1"
FINGERPRINT_SAMPLE = 1 << 20


def fingerprint(path: Path) -> str:
    """A cheap, stable fingerprint of a checkpoint: sha256 over each safetensors file's header, size and 1 MiB
    samples at the start, middle and end of its data (every .safetensors file of a folder, sorted by path).
    Not the sha256 of the data (that would read ~14 GB for an fp32 SDXL); it changes whenever the header does."""
    digest = hashlib.sha256()
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        size = file.stat().st_size
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_len, size)))
            data_start = 8 + header_len
            for offset in (data_start, (data_start + size) // 2, size - FINGERPRINT_SAMPLE):
                handle.seek(max(data_start, offset))
                digest.update(handle.read(FINGERPRINT_SAMPLE))
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"
