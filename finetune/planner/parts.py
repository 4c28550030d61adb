"""The model as the planner sees it: built on the meta device (shapes only: no memory, no weights).

``model_parts``: the configured architecture (real SDXL, a diffusers folder's configs, or the builtin tiny model)
with exact parameter counts per part and the shapes of the parameters that train.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from xlbake.sdxl.parts import MODEL_PARTS, PART_ATTRS

COMPONENTS = (*MODEL_PARTS, "vae")
"""The diffusers components the planner builds (the keys of the architecture configs)."""
PART_NAMES = {**{component: part for part, component in PART_ATTRS.items()}, "vae": "vae"}
"""Diffusers component -> the planner's part name (``xlbake.sdxl.parts``' short names, and "vae")."""


@dataclass(frozen=True)
class Part:
    """One SDXL component, counted on the meta device."""

    name: str
    """"unet", "te1", "te2" or "vae"."""
    config: Mapping[str, Any]
    """Its constructor config."""
    params: int
    buffer_bytes: int
    """Buffers (e.g. the text encoders' position ids): copied by EMA."""
    trained_shapes: tuple[tuple[int, ...], ...]
    """Shapes of the parameters that get gradients when this part trains (TE1's unreachable last layer and final
    norm stay frozen, see ``finetune.model.unreachable_parameters``)."""


def model_parts(model_cfg: Any) -> tuple[str, tuple[Part, ...], tuple[str, ...]]:
    """(where the architecture came from, the four parts, notes) for a ``ModelConfig``. Nothing is downloaded."""
    configs, source, notes = architecture(model_cfg)
    return source, _parts(json.dumps(configs, sort_keys=True)), notes


def architecture(model_cfg: Any) -> tuple[dict[str, dict[str, Any]], str, tuple[str, ...]]:
    """The component configs the trainer would build: builtin tiny, a diffusers folder's (the base, else
    ``model.components``), the locally cached hub id's, or SDXL base 1.0's (``xlbake.sdxl.configs``)."""
    from finetune.config import SDXL_HUB_ID, builtin_name
    from xlbake.errors import ConfigError
    from xlbake.sdxl.configs import SDXL_CONFIGS
    from xlbake.sdxl.models import single_file_kind

    name = builtin_name(model_cfg.base)
    if name is not None:
        if name != "tiny":
            raise ConfigError(f"model.base: unknown builtin model {name!r}; the builtin model is builtin:tiny")
        return _tiny_configs(), "builtin tiny model", ()
    base, components = Path(model_cfg.base), str(model_cfg.components)
    folder = base if base.is_dir() else Path(components) if Path(components).is_dir() else None
    if folder is not None:
        return {c: _read_json(folder / c / "config.json") for c in COMPONENTS}, f"{folder} (config.json files)", ()
    sdxl = {c: dict(SDXL_CONFIGS[c]) for c in COMPONENTS}
    if components == SDXL_HUB_ID:  # as the trainer: the file's shapes say which (InputError for other sizes)
        if base.is_file() and single_file_kind(base) == "tiny":
            return _tiny_configs(), f"the builtin tiny model (recognised in {base})", ()
        return sdxl, "SDXL base 1.0 (xlbake.sdxl.configs)", ()
    cached = _cached_hub_configs(components)
    if cached is not None:
        return cached, f"{components} (local hub cache)", ()
    return sdxl, "SDXL base 1.0 (assumed)", (f"model.components {components} is not cached here: assumed SDXL",)


def _tiny_configs() -> dict[str, dict[str, Any]]:
    from xlbake.sdxl.tiny import build_tokenizers, tiny_configs

    return tiny_configs(*build_tokenizers())


def _read_json(path: Path) -> dict[str, Any]:
    from xlbake.errors import InputError

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: cannot read the component config ({exc}); point model.base/components at a diffusers folder"
        ) from exc


def _cached_hub_configs(repo: str) -> dict[str, dict[str, Any]] | None:
    from huggingface_hub import try_to_load_from_cache

    paths = {c: try_to_load_from_cache(repo, f"{c}/config.json") for c in COMPONENTS}
    if not all(isinstance(p, str) for p in paths.values()):
        return None
    return {c: _read_json(Path(p)) for c, p in paths.items()}


@functools.lru_cache(maxsize=8)
def _parts(key: str) -> tuple[Part, ...]:
    from accelerate import init_empty_weights

    from finetune.model import unreachable_parameters

    configs = json.loads(key)
    with init_empty_weights():
        modules = {c: build_part(c, configs[c]) for c in COMPONENTS}
    dead = set(unreachable_parameters(SimpleNamespace(text_encoder=modules["text_encoder"]))["te1"])
    parts = []
    for component, module in modules.items():
        name = PART_NAMES[component]
        frozen = dead if name == "te1" else set()
        shapes = tuple(tuple(p.shape) for n, p in module.named_parameters() if n not in frozen)
        params = sum(p.numel() for p in module.parameters())
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        parts.append(Part(name, configs[component], params, buffers, shapes))
    return tuple(parts)


def build_part(component: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """unet / text_encoder / text_encoder_2 / vae from its config (constructor kwargs or a config.json)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if component in ("unet", "vae"):
        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        return cls.from_config(dict(config))
    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    return cls(CLIPTextConfig(**config))
