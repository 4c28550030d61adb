"""Calibration files: the input second moments C = E[x xᵀ] of a model's LoRA layers, one tensor per kohya module.

Written by ``extract --calibrate RUN`` (extract.calibrate) as ``RUN/calibration.safetensors``; read by extract and
resize for the whitened (activation-aware) factorization of :mod:`xlbake.lora.whiten`. Tensors: kohya module name
(``lora_unet_...``, ``lora_te1_...``, ``lora_te2_...``) -> fp32 (in, in). Metadata: ``format``, the base model's
name and fingerprint, images, timesteps per image, seed, image file names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from xlbake.errors import InputError
from xlbake.lora.whiten import DAMPING

FORMAT = "xlbake-calibration/1"


@dataclass(frozen=True)
class Calibration:
    """A calibration file's contents."""

    moments: dict[str, Tensor]  # kohya module name -> E[x xᵀ] (in, in), fp32
    metadata: dict[str, str]


def read_calibration(path: Path) -> Calibration:
    """The moments and metadata of a calibration file; InputError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            moments = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: unreadable calibration file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not an xlbake calibration file (format {metadata.get('format')!r})")
    return Calibration(moments, metadata)


def summary(metadata: Mapping[str, str]) -> str:
    """One line saying what a calibration was computed from, for messages and the LoRA's metadata."""
    return f"{metadata.get('images')} images x {metadata.get('timesteps_per_image')} timesteps of {metadata.get('run')}"


def calibration_info(calibration: Calibration) -> dict[str, str]:
    """What a calibrated LoRA records of its calibration (``xlbake_calibration`` metadata)."""
    keep = ("base", "base_fingerprint", "images", "timesteps_per_image", "seed")
    return {**{key: calibration.metadata[key] for key in keep if key in calibration.metadata}, "damping": str(DAMPING)}


def moment_for(calibration: Calibration, name: str) -> Tensor | None:
    """The input moment of LoRA module ``name`` (kohya's old ``lora_te_`` prefix read as ``lora_te1_``), or None."""
    if name.startswith("lora_te_"):
        name = "lora_te1_" + name[len("lora_te_") :]
    return calibration.moments.get(name)
