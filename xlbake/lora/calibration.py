"""Calibration files: the input second moments C = E[x xᵀ] of a model's LoRA layers, compressed and shared.

Written by ``extract --calibrate RUN`` (extract.calibrate) as ``RUN/calibration.safetensors``; read by extract and
resize for the whitened (activation-aware) factorization of :mod:`xlbake.lora.whiten`.

Format ``xlbake-calibration/2``: one moment per distinct layer *input*, in the compressed form of
:mod:`xlbake.lora.moments` (tensors ``GROUP.basis`` (in, k), ``GROUP.values`` (k,), ``GROUP.rest`` ()), and the
metadata ``modules``: JSON kohya module name -> GROUP; a 3x3 conv's group adds ``GROUP.taps`` (9, 9), its
Kronecker tap moment (:func:`xlbake.lora.moments.tap_moment`). Layers that read the same tensor share a group
(:func:`moment_group`): an attention's q/k/v (TE2's fused in_proj rows too), every UNet cross-attention k/v (all
read the text encoders' hidden states) and every ResNet's time-embedding projection (all read SiLU of the one
time embedding). Other metadata: the base model's name and fingerprint, images, timesteps per image, seed, image
file names. Format /1 files (one dense moment per module, 17 GB for SDXL) are refused: recompute them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xlbake.errors import InputError
from xlbake.fileio import save_safetensors_atomic
from xlbake.lora.moments import MOMENT_RANK, Moment
from xlbake.lora.names import LoraTarget, kohya_targets
from xlbake.lora.whiten import DAMPING

FORMAT = "xlbake-calibration/2"
_SHARED = (
    (re.compile(r"^(lora_unet_).*_attn2_to_[kv]$"), r"\1context"),
    (re.compile(r"^(lora_unet_).*_emb_layers_1$"), r"\1time_embedding"),
    (re.compile(r"^(.*_attn1_)to_[qkv]$"), r"\1qkv"),
    (re.compile(r"^(lora_te.*_self_attn_)[qkv]_proj$"), r"\1qkv"),
)


@dataclass(frozen=True)
class Calibration:
    """A calibration file's contents."""

    moments: dict[str, Moment]  # moment group -> compressed E[x xᵀ] of that input
    modules: dict[str, str]  # kohya module name -> its moment group
    metadata: dict[str, str]


def moment_group(name: str) -> str:
    """The moment a kohya module's input shares with others (see the module docstring), or its own name."""
    for pattern, group in _SHARED:
        if pattern.match(name):
            return pattern.sub(group, name)
    return name


def calibrated_targets(shapes: Mapping[str, Sequence[int]]) -> list[LoraTarget]:
    """The LoRA layers statistics are collected for: every kohya module (conv and extra sets too)."""
    return kohya_targets(shapes, conv=True, extra=True)


def moment_numbers(shape: Sequence[int], rank: int = MOMENT_RANK) -> int:
    """Numbers stored for the input moment of a weight of ``shape``: basis, values and the remainder of its
    (in, in) channel moment, and a kh x kw conv's (kh·kw)² tap moment."""
    size, k, taps = shape[1], min(rank, shape[1]), math.prod(shape[2:])
    return size * k + k + 1 + (taps * taps if taps > 1 else 0)


def statistics_bytes(shapes: Mapping[str, Sequence[int]]) -> int:
    """Bytes of the tensors of a calibration file for a checkpoint with SGM ``shapes`` (fp32, from shapes only)."""
    groups = {moment_group(t.name): t.shape for t in calibrated_targets(shapes)}
    return 4 * sum(moment_numbers(shape) for shape in groups.values())


def write_calibration(calibration: Calibration, path: Path, force: bool = False) -> Path:
    """Save ``calibration`` (format /2) atomically."""
    tensors = {}
    for group, moment in calibration.moments.items():
        tensors[f"{group}.basis"] = _stored(moment.basis)
        tensors[f"{group}.values"] = _stored(moment.values)
        tensors[f"{group}.rest"] = torch.tensor(moment.rest, dtype=torch.float64)
        if moment.taps is not None:
            tensors[f"{group}.taps"] = _stored(moment.taps)
    metadata = {**calibration.metadata, "format": FORMAT, "modules": json.dumps(calibration.modules)}
    return save_safetensors_atomic(tensors, path, metadata, force=force)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """fp32 CPU copy: safetensors refuses tensors that share memory (one tap moment object for many convs)."""
    return t.detach().to("cpu", torch.float32, copy=True)


def read_calibration(path: Path, *, convs: bool = True) -> Calibration:
    """The moments and metadata of a calibration file; InputError if it is not one (or an old format). Without
    ``convs`` its 3x3 conv statistics are left out (:func:`without_convs`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: unreadable calibration file ({exc})") from exc
    found = metadata.pop("format", None)
    if found == "xlbake-calibration/1":
        raise InputError(f"{path}: an old calibration file (format /1, dense moments); delete it and recompute it "
                         "with extract --calibrate RUN")  # fmt: skip
    if found != FORMAT:
        raise InputError(f"{path}: not an xlbake calibration file (format {found!r})")
    try:
        modules = json.loads(metadata.pop("modules"))
        groups = set(modules.values())
        moments = {
            g: Moment(tensors[f"{g}.basis"], tensors[f"{g}.values"], float(tensors[f"{g}.rest"]),
                      tensors.get(f"{g}.taps"))
            for g in groups
        }  # fmt: skip
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: incomplete calibration file ({exc})") from exc
    calibration = Calibration(moments, modules, metadata)
    return calibration if convs else without_convs(calibration)


def summary(metadata: Mapping[str, str]) -> str:
    """One line saying what a calibration was computed from, for messages and the LoRA's metadata."""
    return f"{metadata.get('images')} images x {metadata.get('timesteps_per_image')} timesteps of {metadata.get('run')}"


def calibration_info(calibration: Calibration) -> dict[str, str]:
    """What a calibrated LoRA records of its calibration (``xlbake_calibration`` metadata)."""
    keep = ("base", "base_fingerprint", "images", "timesteps_per_image", "seed", "split", "convs")
    return {**{key: calibration.metadata[key] for key in keep if key in calibration.metadata}, "damping": str(DAMPING)}


def without_convs(calibration: Calibration) -> Calibration:
    """The calibration with its 3x3 conv (Kronecker) statistics left out, so those layers are factored plainly."""
    convs = {group for group, moment in calibration.moments.items() if moment.taps is not None}
    modules = {name: group for name, group in calibration.modules.items() if group not in convs}
    moments = {group: moment for group, moment in calibration.moments.items() if group not in convs}
    return Calibration(moments, modules, {**calibration.metadata, "convs": "plain"})


def moment_for(calibration: Calibration, name: str) -> Moment | None:
    """The input moment of LoRA module ``name`` (kohya's old ``lora_te_`` prefix read as ``lora_te1_``), or None."""
    if name.startswith("lora_te_"):
        name = "lora_te1_" + name[len("lora_te_") :]
    group = calibration.modules.get(name)
    return None if group is None else calibration.moments[group]
