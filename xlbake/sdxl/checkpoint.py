"""Streaming SDXL checkpoint reading and writing: one tensor in memory at a time.

:func:`open_checkpoint` gives an SGM-keyed view (the original single-file names, see :mod:`xlbake.sdxl.keys`) of
a single-file ``.safetensors`` or a diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``,
possibly sharded), reading one tensor at a time through :mod:`xlbake.sdxl.tensorfile`. Only SDXL-architecture
models are accepted, told apart by structure, not size.

:func:`save_sgm_checkpoint` and :func:`convert_diffusers_folder` write single-file SGM safetensors atomically
(temp + rename via :mod:`xlbake.fileio`), with modelspec metadata, streaming tensor by tensor. The prediction type
labels (:mod:`xlbake.sdxl.prediction`: a ``v_pred`` key, ``modelspec.prediction_type``) are written from the caller's
prediction type; readers hide the label keys from the tensor view and list them in ``CheckpointReader.markers``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xlbake.errors import InputError
from xlbake.fileio import check_output
from xlbake.sdxl.keys import (
    COMPONENTS,
    SGM_PREFIX,
    KeyEntry,
    diffusers_state_dicts,
    plan_from_diffusers,
    sgm_shape,
    sgm_state_dict,
    to_sgm,
    with_text_model,
)
from xlbake.sdxl.prediction import (
    EPSILON,
    MARKER_KEYS,
    MODELSPEC_KEY,
    declared_prediction,
    marker_tensors,
    modelspec_value,
)
from xlbake.sdxl.tensorfile import PICKLE_SUFFIXES, PickleFile, SafetensorsFile, Spec, write_safetensors

__all__ = [
    "CheckpointReader",
    "convert_diffusers_folder",
    "detect_family",
    "diffusers_state_dicts",
    "open_checkpoint",
    "save_sgm_checkpoint",
    "sgm_state_dict",
]

MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    "modelspec.resolution": "1024x1024",
}


class CheckpointReader:
    """SGM-keyed, read-only view of a checkpoint; :meth:`get` loads one tensor. Use as a context manager."""

    def __init__(
        self,
        path: Path,
        source: str,
        sources: dict[str, tuple[KeyEntry | None, list[tuple[Any, str]]]],
        specs: dict[str, Spec],
        files: list[Any],
        markers: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self.source = source  # "single_file" | "diffusers" | "pickle"
        self.markers = markers  # label keys of a single file (e.g. "v_pred"), kept out of the tensor view
        self._sources = sources  # SGM key -> (entry or None for a stored SGM tensor, [(file, stored name), ...])
        self._specs: dict[str, Spec] = specs
        self._files = files
        self.family = detect_family(self.shapes(), str(path))

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata of a single file (empty for a folder)."""
        return dict(self._files[0].metadata) if self.source != "diffusers" else {}

    def keys(self) -> list[str]:
        return list(self._specs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """SGM key -> shape of every tensor (what :func:`xlbake.lora.names.kohya_targets` takes)."""
        return {k: spec[1] for k, spec in self._specs.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self._spec(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return self._spec(key)[0]

    def get(self, key: str) -> Tensor:
        """Load only this tensor (a TE2 ``in_proj`` from a diffusers folder concatenates its q, k and v)."""
        self._spec(key)
        entry, parts = self._sources[key]
        tensors = [file.read(name) for file, name in parts]
        return tensors[0] if entry is None else to_sgm(entry, tensors)

    def pieces(self, key: str, scratch: Tensor) -> Iterator[Tensor]:
        """This tensor flattened, in consecutive pieces read into ``scratch`` (uint8; each piece valid until the
        next is read) from a single safetensors file; one assembled from several (a diffusers TE2 ``in_proj``) or
        held by a pickle comes whole, as one piece."""
        self._spec(key)
        entry, parts = self._sources[key]
        if entry is None and isinstance(parts[0][0], SafetensorsFile):
            yield from parts[0][0].read_pieces(parts[0][1], scratch)
        else:
            yield self.get(key).reshape(-1)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spec(self, key: str) -> Spec:
        if key not in self._specs:
            raise InputError(f"{self.path}: no tensor named {key}; the checkpoints differ in architecture")
        return self._specs[key]


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> CheckpointReader:
    """Open a single-file SDXL ``.safetensors`` or a diffusers SDXL folder as an SGM-keyed :class:`CheckpointReader`.

    Pickles (``.ckpt/.pt/.pth/.bin``) are refused unless ``allow_pickle`` (then loaded weights-only, not streamed).
    InputError for a missing/corrupt/truncated file and for anything that is not SDXL (SD 1.x/2.x, refiner, ...).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors first")
        file: SafetensorsFile | PickleFile = PickleFile(path)
    else:
        file = SafetensorsFile(path)
    sources, specs = {}, {}
    te1 = SGM_PREFIX["text_encoder"]
    markers = frozenset(name for name in file.specs if name in MARKER_KEYS)
    for name, spec in file.specs.items():
        if name in markers:
            continue
        # a TE1 saved from a transformers 5 CLIPTextModel lacks "text_model."; present the canonical SGM name
        key = te1 + with_text_model(name[len(te1) :]) if name.startswith(te1) else name
        sources[key], specs[key] = (None, [(file, name)]), spec
    source = "pickle" if isinstance(file, PickleFile) else "single_file"
    return CheckpointReader(path, source, sources, specs, [file], markers)


def _open_folder(path: Path, allow_pickle: bool) -> CheckpointReader:
    index = path / "model_index.json"
    if not index.exists() and not (path / "unet").is_dir():
        found = "a diffusers component folder" if (path / "config.json").exists() else "no model_index.json or unet/"
        raise InputError(f"{path}: {found}; pass a diffusers SDXL pipeline folder or a single .safetensors file")
    if index.exists():
        class_name = str(_read_json(index).get("_class_name", ""))
        if class_name and "XL" not in class_name:
            raise InputError(f"{path}: diffusers {class_name} folder, not SDXL; xlbake works on SDXL models only")
    files: dict[str, dict[str, SafetensorsFile]] = {}  # component -> stored name -> file
    for component in COMPONENTS:
        if (path / component).is_dir():
            files[component] = _component_files(path / component, allow_pickle)
    if "unet" not in files:
        raise InputError(f"{path}: no unet/ folder; pass a complete diffusers SDXL pipeline folder")
    plan = plan_from_diffusers({c: list(names) for c, names in files.items()})
    sources, specs = {}, {}
    for key, entry in plan.items():
        parts = [(files[entry.component][name], name) for name in entry.diffusers]
        part_specs = [file.specs[name] for file, name in parts]
        sources[key] = (entry, parts)
        specs[key] = (part_specs[0][0], sgm_shape(entry, [s[1] for s in part_specs]))
    unique = list({id(f): f for names in files.values() for f in names.values()}.values())
    return CheckpointReader(path, "diffusers", sources, specs, unique)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read as JSON ({exc}); re-download or fix the file") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; re-download or fix the file")
    return data


def _component_files(folder: Path, allow_pickle: bool) -> dict[str, Any]:
    """Stored tensor name -> file for one diffusers component folder (single file, sharded, or one variant)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"), key=lambda p: (p.name.count("."), p.name))
    if indexes:
        shards = sorted(set(_read_json(indexes[0]).get("weight_map", {}).values()))
        paths = [folder / shard for shard in shards]
    else:
        weights = sorted(folder.glob("*.safetensors"), key=lambda p: (p.name.count("."), p.name))
        plain = [p for p in weights if p.name.count(".") == 1]  # model.safetensors beats model.fp16.safetensors
        paths = plain[:1] or weights[:1]
        if len(weights) > 1 and not plain:
            names = ", ".join(p.name for p in weights)
            raise InputError(f"{folder}: several weight variants ({names}) and no plain one; keep only one of them")
    if not paths:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not pickles:
            raise InputError(f"{folder}: no .safetensors weights found")
        if not allow_pickle:
            raise InputError(
                f"{pickles[0]}: pickle weights can run code when loaded; re-save the folder as safetensors"
            )
        opened: list[Any] = [PickleFile(p) for p in pickles]
    else:
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise InputError(f"{missing[0]}: shard listed in the index is missing; re-download the folder")
        opened = [SafetensorsFile(p) for p in paths]
    return {name: file for file in opened for name in file.specs}


def detect_family(shapes: Mapping[str, tuple[int, ...]], where: str) -> str:
    """``"sdxl"`` for the SDXL base architecture at any size, else InputError naming what was found instead.

    SDXL here means: a UNet with the size/crop ``label_emb``, CLIP text encoder as ``conditioner.embedders.0``,
    OpenCLIP as ``conditioner.embedders.1``, cross-attention width = sum of both encoders' widths, and a
    ``label_emb`` input of pooled width + 6 time-id embeddings.
    """
    found = _not_sdxl(shapes)
    if found:
        raise InputError(f"{where}: not an SDXL checkpoint: {found}; xlbake works on SDXL-architecture models only")
    return "sdxl"


def _not_sdxl(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    keys = list(shapes)
    unet, te1, te2 = SGM_PREFIX["unet"], SGM_PREFIX["text_encoder"], SGM_PREFIX["text_encoder_2"]
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "SD 1.x layout (CLIP text encoder under cond_stage_model.transformer)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "SD 2.x layout (OpenCLIP text encoder under cond_stage_model.model)"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "SDXL refiner layout (a single OpenCLIP encoder as conditioner.embedders.0)"
    if not any(k.startswith(unet) for k in keys):
        diffusers = [k for k in keys if k.startswith(("down_blocks.", "text_model.", "encoder.down_blocks."))]
        if diffusers:
            return f"diffusers-named tensors (e.g. {diffusers[0]}): a component file; pass the whole diffusers folder"
        return f"no UNet tensors ({unet}*) among {len(keys)} tensors, e.g. {keys[:2]}"
    label = shapes.get(unet + "label_emb.0.0.weight")
    if label is None:
        return "a UNet without SDXL's label_emb (size/crop conditioning), as in SD 1.x/2.x"
    te1_norm = shapes.get(te1 + "text_model.final_layer_norm.weight")
    te2_norm, projection = shapes.get(te2 + "ln_final.weight"), shapes.get(te2 + "text_projection")
    if te1_norm is None or te2_norm is None or projection is None:
        return f"text encoders missing (need {te1}* and {te2}*)"
    context = next((s[1] for k, s in shapes.items() if k.startswith(unet) and k.endswith("attn2.to_k.weight")), None)
    if context != te1_norm[0] + te2_norm[0]:
        return f"cross-attention width {context} is not text encoder widths {te1_norm[0]} + {te2_norm[0]}"
    time_ids = label[1] - projection[1]
    if time_ids <= 0 or time_ids % 6:
        return f"label_emb input {label[1]} is not pooled width {projection[1]} + 6 time-id embeddings"
    return None


def _metadata(path: Path, metadata: Mapping[str, Any] | None, prediction: str) -> dict[str, str]:
    """Modelspec keys for SDXL merged with the caller's (caller wins, except on the prediction type, which must match
    the file's ``v_pred`` key); every value a string (JSON for containers)."""
    meta: dict[str, Any] = {**MODELSPEC, "modelspec.title": path.stem}
    meta["modelspec.date"] = datetime.now().isoformat(timespec="seconds")
    meta.update(metadata or {})
    meta[MODELSPEC_KEY] = modelspec_value(prediction)
    out = {}
    for key, value in meta.items():
        out[str(key)] = (
            value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)
        )
    return out


def _cast(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and dtype.is_floating_point else dtype


def save_sgm_checkpoint(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    prediction: str = EPSILON,
) -> Path:
    """Write SGM-keyed tensors as one SDXL safetensors file: atomic, never overwriting without ``force``.

    ``dtype`` casts floating tensors (integer buffers keep theirs). Metadata: SDXL modelspec keys (title = file
    stem, date = now) merged with ``metadata``; non-string values are stored as strings (JSON for dicts/lists).
    ``prediction`` ("epsilon" | "v_prediction") sets ``modelspec.prediction_type`` and, for v-prediction, the
    ``v_pred`` key UIs read; label keys among ``tensors`` are replaced.
    """
    path = check_output(path, force)
    specs = {k: (_cast(t.dtype, dtype), tuple(t.shape)) for k, t in tensors.items()}
    specs, fetch = _labelled(specs, tensors.__getitem__, prediction)
    return write_safetensors(path, specs, fetch, metadata=_metadata(path, metadata, prediction), force=force)


def _labelled(specs: Mapping[str, Spec], fetch: Callable[[str], Tensor], prediction: str) -> tuple[dict, Callable]:
    """``specs`` and ``fetch`` with the label keys of ``prediction`` in place of any label keys they had."""
    markers = marker_tensors(prediction)
    specs = {k: s for k, s in specs.items() if k not in MARKER_KEYS}
    specs |= {k: (t.dtype, tuple(t.shape)) for k, t in markers.items()}
    return specs, lambda key: markers[key] if key in markers else fetch(key)


def convert_diffusers_folder(
    src_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Diffusers SDXL folder -> single-file SGM safetensors, streaming one tensor at a time (atomic), labelled with
    the prediction type of the folder's scheduler config."""
    out_file = check_output(out_file, force)
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise InputError(f"{src_dir}: not a folder; convert_diffusers_folder takes a diffusers SDXL folder")
    with open_checkpoint(src_dir) as reader:
        for component in COMPONENTS:
            if not any(k.startswith(SGM_PREFIX[component]) for k in reader):
                raise InputError(f"{src_dir}: no {component}/ weights; a single-file SDXL checkpoint needs all four")
        declared = declared_prediction(reader)
        prediction = declared.prediction if declared else EPSILON
        specs = {k: (_cast(reader.dtype(k), dtype), reader.shape(k)) for k in reader}
        specs, fetch = _labelled(specs, reader.get, prediction)
        meta = _metadata(out_file, {"modelspec.title": src_dir.name, **(metadata or {})}, prediction)
        return write_safetensors(out_file, specs, fetch, metadata=meta, force=force)
