"""kohya-format LoRA files: read, write and describe them so that every SDXL UI loads them the same way.

A module ``NAME`` is stored as ``NAME.lora_down.weight`` (r, in) or (r, in, kh, kw), ``NAME.lora_up.weight``
(out, r) or (out, r, 1, 1) and a 0-dim ``NAME.alpha``; loaders apply ``alpha / r * up @ down``. We write ONE
alpha for every module and fold each layer's scale into its factors, because diffusers gives modules whose alpha
differs from the most common one a wrong scale (see ``docs`` and ``../shared/reference/lora-format.md``).
Other LoRA kinds (LyCORIS LoHa/LoKr, DoRA, Tucker ``lora_mid``, ``.diff`` modules, diffusers/PEFT naming) are
refused with the keys that show them, never half-read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open

from xlbake.errors import InputError, OutputError
from xlbake.fileio import atomic_path, check_output
from xlbake.lora.lowrank import all_finite
from xlbake.lora.names import module_kind
from xlbake.sdxl.prediction import EPSILON, MODELSPEC_KEY, modelspec_value
from xlbake.sdxl.tensorfile import PICKLE_SUFFIXES, SafetensorsFile, replace_in_header, stream_safetensors

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
COMPONENT_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te_": "te1"}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Precision name (``save_precision`` in every stage's config) -> dtype of the tensors written."""
HASH_KEY = "sshs_model_hash"
# Keys never written: diffusers raises on lora_adapter_metadata next to .alpha tensors; the others would be stale.
DROPPED_KEYS = ("lora_adapter_metadata", "sshs_legacy_hash", "modelspec.hash_sha256", HASH_KEY)
# Same length as a sha256 hex digest, so the real hash replaces it in place without moving the data section.
_HASH_PLACEHOLDER = "xlbake-sshs-model-hash-pending".ljust(64, "0")
_EXAMPLES = 3
_NO_EXTRA: Mapping[str, str] = MappingProxyType({})

SDXL_BASE_VERSION = "sdxl_base_v1-0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

# Foreign formats, checked in this order; each pattern is searched in every tensor key.
_FOREIGN_KINDS: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    ("loha", "LyCORIS LoHa LoRA", re.compile(r"\.hada_[wt]\d")),
    ("lokr", "LyCORIS LoKr LoRA", re.compile(r"\.lokr_[wt]\d")),
    ("dora", "DoRA LoRA (dora_scale)", re.compile(r"dora_scale")),
    ("tucker", "Tucker/LoCon-CP LoRA (lora_mid)", re.compile(r"\.lora_mid\.")),
    ("diff", "full-difference modules (.diff/.diff_b)", re.compile(r"\.diff(_b)?$")),
    (
        "peft",
        "diffusers/PEFT-named LoRA",
        re.compile(r"(^|\.)lora_[AB]\.|\.lora\.(down|up)\.|lora_linear_layer|^(unet|text_encoder(_2)?|transformer)\."),
    ),
)
_KIND_TEXT = {name: text for name, text, _ in _FOREIGN_KINDS} | {
    "unknown": "LoRA layout (keys outside kohya's lora_unet_/lora_te1_/lora_te2_ down/up/alpha set)",
}


@dataclass(frozen=True)
class LoraModule:
    """One kohya LoRA module; the weight change it applies is ``alpha / rank * up @ down``."""

    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kind(self) -> str:
        """``linear``, ``conv1x1`` or ``conv3x3`` (any kernel larger than 1x1)."""
        return module_kind(self.down.shape)

    @property
    def params(self) -> int:
        return self.up.numel() + self.down.numel()

    def delta(self) -> torch.Tensor:
        """The weight change in fp32 with the weight's shape: (out, in) or (out, in, kh, kw)."""
        up = self.up.float().flatten(1)
        down = self.down.float().flatten(1)
        return (self.scale * (up @ down)).reshape(up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoraFile:
    modules: dict[str, LoraModule]  # kohya names, e.g. "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    metadata: dict[str, str]  # header metadata as untrusted text, never evaluated
    path: Path


@dataclass(frozen=True)
class LoraKind:
    """What a set of tensor keys is: ``kohya`` (supported), a foreign LoRA kind, or ``checkpoint``/``empty``."""

    name: str
    keys: tuple[str, ...]  # up to three keys that show it

    @property
    def supported(self) -> bool:
        return self.name == "kohya"


def module_component(name: str) -> str:
    """``unet``, ``te1`` or ``te2`` for a kohya module name or key (``lora_te_`` is the single-encoder te1 name)."""
    for prefix, component in COMPONENT_PREFIXES.items():
        if name.startswith(prefix):
            return component
    raise InputError(f"{name}: not a kohya LoRA name; expected a lora_unet_/lora_te1_/lora_te2_ prefix")


def lora_kind_of(keys: Iterable[str]) -> LoraKind:
    """Classify a safetensors file's tensor keys as kohya LoRA, a foreign LoRA kind, or not a LoRA at all."""
    keys = sorted(keys)
    if not keys:
        return LoraKind("empty", ())
    for name, _, pattern in _FOREIGN_KINDS:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            return LoraKind(name, tuple(hits[:_EXAMPLES]))
    prefixes = tuple(COMPONENT_PREFIXES)
    good = [k for k in keys if k.startswith(prefixes) and k.endswith((DOWN, UP, ALPHA))]
    good_set = set(good)
    odd = [k for k in keys if k not in good_set]
    if not good and not any("lora" in k.lower() for k in keys):
        return LoraKind("checkpoint", tuple(keys[:_EXAMPLES]))
    if odd or not good:
        return LoraKind("unknown", tuple(odd[:_EXAMPLES]))
    return LoraKind("kohya", tuple(good[:_EXAMPLES]))


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya-format LoRA safetensors file; refuse anything else with an ``InputError`` naming keys."""
    path = Path(path)
    _check_input_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            _refuse_kind(path, lora_kind_of(keys))
            metadata = dict(handle.metadata() or {})
        with closing(SafetensorsFile(path)) as source:  # no memory map: each dropped module's memory goes back
            tensors = {key: source.read(key) for key in keys}
    except SafetensorError as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc}); is it truncated or corrupt?") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from exc
    return LoraFile(_assemble_modules(path, tensors), metadata, path)


def write_lora(
    path: str | os.PathLike,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    metadata: Mapping[str, str],
    dtype: torch.dtype = torch.float16,
    alpha: float | None = None,
    force: bool = False,
) -> Path:
    """Write ``name -> (up, down)`` (delta == up @ down, scale 1) as a kohya LoRA with one alpha for every module.

    Shapes: up (out, r) and down (r, in) for Linear; up (out, r, 1, 1) or (out, r) and down (r, in, kh, kw) for
    convs. ``alpha`` defaults to the largest rank; each layer's factors are multiplied by sqrt(r / alpha) in fp32
    before casting so that ``alpha / r * up' @ down' == up @ down``. Adds ``sshs_model_hash``; atomic; refuses an
    existing file without ``force``.
    """
    path = check_output(path, force)
    if dtype not in SAVE_DTYPES.values():
        raise ValueError(f"write_lora: dtype must be one of {tuple(SAVE_DTYPES.values())}, got {dtype}")
    if not factors:
        raise ValueError("write_lora: no modules to write")
    shaped = {name: _checked_factors(name, up, down) for name, (up, down) in factors.items()}
    alpha = float(max(down.shape[0] for _, down in shaped.values())) if alpha is None else float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"write_lora: alpha must be a positive finite number, got {alpha}")
    stored_alpha = float(torch.tensor(alpha, dtype=dtype))  # fold against the value loaders will read
    specs = {name + suffix: (dtype, shape) for name, (up, down) in shaped.items()
             for suffix, shape in ((DOWN, tuple(down.shape)), (UP, tuple(up.shape)), (ALPHA, ()))}  # fmt: skip
    header = _output_metadata(path, metadata)
    header[HASH_KEY] = _HASH_PLACEHOLDER
    with atomic_path(path, force) as tmp:
        with open(tmp, "wb") as out:
            digest = stream_safetensors(
                out, tmp, specs, _module_caster(path, shaped, dtype, stored_alpha), metadata=header
            )
        replace_in_header(tmp, _HASH_PLACEHOLDER, digest)
    return path


def _module_caster(path: Path, shaped: Mapping, dtype: torch.dtype, alpha: float) -> Callable[[str], torch.Tensor]:
    """``fetch(key)`` for :func:`stream_safetensors`: each module folded and cast as it is written, one at a time
    (not a second copy of the whole LoRA); its up and down share one fold (none at rank alpha in ``dtype``)."""
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fetch(key: str) -> torch.Tensor:
        name, suffix = key.split(".", 1)  # module names hold no "." (checked)
        if suffix == ALPHA[1:]:
            return torch.tensor(alpha, dtype=dtype)
        if name not in last:
            last.clear()
            last[name] = _ready(path, name, *shaped[name], dtype, alpha)
        return last[name][0] if suffix == UP[1:] else last[name][1]

    return fetch


def _ready(path: Path, name: str, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype, alpha: float) -> tuple:
    """One module's factors folded by alpha and cast to ``dtype``; as held (extract's usual case: fp16 factors at the
    largest rank) when of rank alpha and in ``dtype``."""
    held = down.shape[0] == alpha and up.dtype == down.dtype == dtype
    up, down = (up, down) if held else fold_alpha(up, down, alpha)
    if not (all_finite(up) and all_finite(down)):
        raise ValueError(f"write_lora: {name}: factors hold NaN/Inf")
    if held:
        return up, down
    cast = up.to(dtype), down.to(dtype)
    if not all(all_finite(t) for t in cast):
        raise OutputError(f"{path}: module {name} overflows {dtype}; save as bf16 or fp32 instead")
    return cast


def fold_alpha(up: torch.Tensor, down: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both factors by sqrt(r / alpha) in fp32, so that (alpha / r) * up' @ down' == up @ down."""
    factor = math.sqrt(down.shape[0] / alpha)
    return up.float() * factor, down.float() * factor


def lora_metadata(
    *,
    title: str,
    ranks: Mapping[str, int],
    alpha: float,
    conv_rank: int | None,
    extra: Mapping[str, str] = _NO_EXTRA,
    comment: str | None = None,
    prediction: str = EPSILON,
    conv_names: Iterable[str] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` and modelspec metadata for an SDXL LoRA; every value a string.

    ``ranks`` holds every module's rank; ``conv_rank`` is the 3x3 conv (LoCon) rank, None when no convs were made.
    When ranks other than ``conv_rank`` differ, ``ss_network_dim`` and ``ss_network_alpha`` are ``Dynamic`` as
    kohya's resize writes them. ``conv_names`` names the 3x3 conv modules among ``ranks``: only the others count
    for ``ss_network_dim`` (without it, ranks equal to ``conv_rank`` are taken for convs). ``extra`` is added last
    (and may override); ``comment`` sets ``ss_training_comment``. ``prediction`` ("epsilon" | "v_prediction"): what
    the model the LoRA makes predicts, as ``modelspec.prediction_type`` epsilon or v (kohya's convention for LoRAs).
    """
    if not ranks:
        raise ValueError("lora_metadata: no module ranks given")
    if conv_names is None:
        dim = _network_dim(ranks.values(), conv_rank)
    else:
        convs = set(conv_names)
        linear = {rank for name, rank in ranks.items() if name not in convs}
        dim = conv_rank if not linear else next(iter(linear)) if len(linear) == 1 else None
    network_args = {} if conv_rank is None else {"conv_dim": str(conv_rank), "conv_alpha": str(float(alpha))}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic" if dim is None else str(dim),
        "ss_network_alpha": "Dynamic" if dim is None else str(float(alpha)),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_v2": "False",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": datetime.now().isoformat(timespec="seconds"),
        "modelspec.resolution": "1024x1024",
        MODELSPEC_KEY: modelspec_value(prediction),
    }
    if comment is not None:
        meta["ss_training_comment"] = comment
    for key, value in extra.items():
        if not isinstance(value, str):
            raise ValueError(f"lora_metadata: extra[{key!r}] must be a string, got {type(value).__name__}")
        meta[key] = value
    return meta


def _network_dim(ranks: Iterable[int], conv_rank: int | None) -> int | None:
    """The one linear rank, or None when ranks vary (Dynamic)."""
    distinct = set(ranks)
    linear = distinct - {conv_rank} if conv_rank is not None else distinct
    if not linear:
        return conv_rank
    return next(iter(linear)) if len(linear) == 1 else None


def _check_input_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{path}: pickle files are not read (they can run code); convert the LoRA to .safetensors")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the LoRA .safetensors file")
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the LoRA path")


def _refuse_kind(path: Path, kind: LoraKind) -> None:
    if kind.supported:
        return
    shown = ", ".join(kind.keys)
    if kind.name == "empty":
        raise InputError(f"{path}: not a LoRA: the file holds no tensors")
    if kind.name == "checkpoint":
        raise InputError(f"{path}: not a LoRA: a checkpoint? (no lora_unet_/lora_te*_ keys; keys like {shown})")
    raise InputError(
        f"{path}: not supported: {_KIND_TEXT[kind.name]} (keys like {shown}); "
        "only kohya LoRA files (lora_unet_*/lora_te*_ with lora_down/lora_up/alpha) can be read"
    )


def _assemble_modules(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, LoraModule]:
    """Group ``NAME.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` into checked modules."""
    names = sorted({key.split(".", 1)[0] for key in tensors})
    modules = {}
    for name in names:
        down, up, alpha = tensors.get(name + DOWN), tensors.get(name + UP), tensors.get(name + ALPHA)
        if down is None or up is None:
            have = " and ".join(name + s for s in (DOWN, UP, ALPHA) if name + s in tensors)
            missing = " or ".join(name + s for s in (DOWN, UP) if name + s not in tensors)
            raise InputError(f"{path}: {have} without {missing}; the LoRA file is incomplete")
        _check_module_tensors(path, name, up, down, alpha)
        rank = int(down.shape[0])
        modules[name] = LoraModule(up=up, down=down, alpha=float(alpha.item()) if alpha is not None else float(rank))
    return modules


def _check_module_tensors(
    path: Path, name: str, up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor | None
) -> None:
    for key, tensor in ((name + UP, up), (name + DOWN, down)):
        if not tensor.is_floating_point():
            raise InputError(f"{path}: {key} has dtype {tensor.dtype}; LoRA factors must be floating point")
        if not all_finite(tensor):
            raise InputError(f"{path}: {key} holds NaN/Inf values; the LoRA is broken, re-create it")
    conv_up_ok = up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
    if up.ndim != down.ndim or (up.ndim not in (2, 4)) or (up.ndim == 4 and not conv_up_ok):
        raise InputError(
            f"{path}: {name}: up {tuple(up.shape)} and down {tuple(down.shape)} are not a LoRA pair "
            "(Linear: (out, r) and (r, in); conv: (out, r, 1, 1) and (r, in, kh, kw))"
        )
    if up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise InputError(f"{path}: {name}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank")
    if alpha is not None and (alpha.numel() != 1 or not torch.isfinite(alpha.float()).all()):
        raise InputError(f"{path}: {name}{ALPHA} must be one finite number, got shape {tuple(alpha.shape)}")


def _checked_factors(name: str, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (up, down) pair for writing; a 2-D up for a conv down becomes (out, r, 1, 1)."""
    module_component(name)
    if "." in name:
        raise ValueError(f"write_lora: module name {name!r} must not contain '.'")
    if down.ndim == 4 and up.ndim == 2:
        up = up[:, :, None, None]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise ValueError(f"write_lora: {name}: bad shapes up {tuple(up.shape)}, down {tuple(down.shape)}")
    if up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise ValueError(f"write_lora: {name}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on rank")
    if not (up.is_floating_point() and down.is_floating_point()):
        raise ValueError(f"write_lora: {name}: factors must be floating point")
    return up, down


def _output_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, str]:
    """Copy metadata for writing: strings only, valid JSON where a value looks like JSON, stale keys dropped."""
    header = {}
    for key, value in metadata.items():
        if key in DROPPED_KEYS:
            continue
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"write_lora: metadata {key!r} must map to a string, got {type(value).__name__}")
        if value[:1] in ("{", "["):
            try:
                json.loads(value)
            except ValueError as exc:
                raise OutputError(
                    f"{path}: metadata {key!r} looks like JSON but does not parse (A1111 decodes it); fix or drop it"
                ) from exc
        header[key] = value
    return header
