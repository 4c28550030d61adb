"""What it takes to build an SDXL model from a checkpoint: component configs, tokenizers and the noise schedule.

One way for every stage (finetune, grid, fidelity): a diffusers folder supplies its own configs; a hub id is read
from the Hugging Face cache; a single file is recognised by its tensor shapes (header only) as the builtin tiny
model (built in code) or the real SDXL base 1.0 (configs from :mod:`xlbake.sdxl.configs`). The only files the real
SDXL needs from outside are its two tokenizers: fetched from the hub into the Hugging Face cache on first use, as
diffusers does, and read from there afterwards; with ``HF_HUB_OFFLINE=1`` nothing is fetched.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download

from xlbake.errors import InputError
from xlbake.sdxl.checkpoint import open_checkpoint
from xlbake.sdxl.keys import SGM_IGNORED, SGM_PREFIX, plan_from_diffusers, sgm_shape
from xlbake.sdxl.parts import MODEL_PARTS, TEXT_PARTS

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
"""The hub repo whose tokenizers a real SDXL single file uses (the one kohya and diffusers use)."""
TOKENIZER_FILES = ("tokenizer/*", "tokenizer_2/*")
COMPONENT_FILES = (*TOKENIZER_FILES, "*/config.json", "scheduler/scheduler_config.json")
"""What a hub id as components supplies (configs, tokenizers, schedule), never the weights."""


@dataclass(frozen=True)
class Architecture:
    """What it takes to build an SDXL model: diffusers configs, CLIP text configs and the two tokenizers."""

    unet: dict[str, Any]
    text_encoder: Any  # transformers CLIPTextConfig
    text_encoder_2: Any
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    tokenizer: Any  # transformers CLIPTokenizer
    tokenizer_2: Any
    source: str  # where the configs came from, for messages

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side: 2^(VAE levels - 1), 8 for SDXL."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


def resolve_architecture(model: str | os.PathLike, components: str | os.PathLike | None = None) -> Architecture:
    """The architecture of ``model``.

    From ``components`` (a diffusers SDXL folder, or a hub id: its configs and tokenizers from the Hugging Face
    cache, fetched on first use) if given, else from ``model`` if it is a diffusers folder. A single file is
    recognised by its tensor shapes as the builtin tiny model or the real SDXL base 1.0 (InputError otherwise).
    """
    model = Path(model)
    if components is not None:
        local = Path(components).is_dir()
        return _pretrained_architecture(components if local else hub_snapshot(str(components), COMPONENT_FILES))
    if model.is_dir():
        return _pretrained_architecture(model)
    from xlbake.sdxl.configs import SDXL_CONFIGS

    if single_file_kind(model) == "tiny":
        return _tiny_architecture()[0]
    folder = hub_snapshot(SDXL_HUB_ID, TOKENIZER_FILES)
    return _pretrained_architecture(folder, configs=SDXL_CONFIGS, source="SDXL base 1.0 (xlbake.sdxl.configs)")


def single_file_kind(path: Path) -> str:
    """``"tiny"`` or ``"sdxl"`` (base 1.0) from the UNet and text encoder shapes in a single file's header."""
    from xlbake.sdxl.configs import real_sdxl_sgm_shapes

    with open_checkpoint(path) as reader:
        shapes = _model_shapes(reader.shapes())
    if shapes == _tiny_architecture()[1]:
        return "tiny"
    sdxl = _model_shapes(real_sdxl_sgm_shapes())
    if shapes == sdxl:
        return "sdxl"
    raise InputError(
        f"{path}: not SDXL base 1.0's architecture ({_difference(shapes, sdxl)}); point model.components "
        "(--components) at a diffusers folder of its architecture"
    )


def _difference(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str:
    """The first differing key of two shape maps and how many differ, for a message."""
    resized = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if resized:
        first = f"{resized[0]} is {list(shapes[resized[0]])}, not {list(expected[resized[0]])}"
    else:
        first = f"no {missing[0]}" if missing else f"unexpected {extra[0]}"
    return f"{first}; {len(resized)} shapes differ, {len(missing)} keys missing, {len(extra)} extra"


def hub_snapshot(repo: str, patterns: Sequence[str]) -> Path:
    """The files of hub ``repo`` matching ``patterns``, from the Hugging Face cache (HF_HOME / HF_HUB_CACHE),
    downloaded into it on first use; with ``HF_HUB_OFFLINE=1`` only the cache is read.

    InputError (one line: what to download, or which local folder to use instead) when they cannot be had.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(repo, allow_patterns=list(patterns), local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        why = "not in the Hugging Face cache and HF_HUB_OFFLINE=1" if offline else f"cannot be fetched ({exc})"
        include = " ".join(f"'{p}'" for p in patterns)
        raise InputError(
            f"{repo}: {', '.join(patterns)} {why.splitlines()[0][:200]}; download them once with "
            f"`hf download {repo} --include {include}`, or point model.components (--components) at a local SDXL "
            "diffusers folder"
        ) from exc


def build_models(arch: Architecture, parts: Sequence[str]) -> dict[str, torch.nn.Module]:
    """Empty (meta-device) modules of ``parts``: any of "unet", "text_encoder", "text_encoder_2", "vae"."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    builders = {  # copies: models may change their config (e.g. the attention implementation)
        "unet": lambda: UNet2DConditionModel.from_config(copy.deepcopy(arch.unet)),
        "text_encoder": lambda: CLIPTextModel(copy.deepcopy(arch.text_encoder)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(copy.deepcopy(arch.text_encoder_2)),
        "vae": lambda: AutoencoderKL.from_config(copy.deepcopy(arch.vae)),
    }
    with init_empty_weights():
        return {part: builders[part]() for part in parts}


def _architecture(configs: Mapping[str, Any], tokenizer: Any, tokenizer_2: Any, source: str) -> Architecture:
    from transformers import CLIPTextConfig

    te1, te2 = (CLIPTextConfig(**configs[name]) for name in TEXT_PARTS)
    unet, vae, scheduler = (dict(configs[name]) for name in ("unet", "vae", "scheduler"))
    return Architecture(unet, te1, te2, vae, scheduler, tokenizer, tokenizer_2, source)


@functools.lru_cache(maxsize=1)
def _tiny_architecture() -> tuple[Architecture, dict[str, tuple[int, ...]]]:
    """The builtin tiny model's architecture and UNet/text encoder SGM shapes (built once: the BPE takes a second)."""
    from xlbake.sdxl.tiny import build_tokenizers, tiny_configs

    tokenizers = build_tokenizers()
    tiny = _architecture(tiny_configs(*tokenizers), *tokenizers, "the builtin tiny model")
    return tiny, _model_shapes(_sgm_shapes(tiny))


def _pretrained_architecture(
    folder: str | os.PathLike, configs: Mapping[str, Any] | None = None, source: str | None = None
) -> Architecture:
    """Configs (unless given) and tokenizers from a local diffusers SDXL folder (or hub snapshot)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    where, local = str(folder), {"local_files_only": True}
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(where, subfolder=s, **local) for s in ("tokenizer", "tokenizer_2")]
        if configs is not None:
            return _architecture(configs, *tokenizers, source or where)
        te1, te2 = (CLIPTextConfig.from_pretrained(where, subfolder=part, **local) for part in TEXT_PARTS)
        unet = dict(UNet2DConditionModel.load_config(where, subfolder="unet", **local))
        vae = dict(AutoencoderKL.load_config(where, subfolder="vae", **local))
        scheduler = dict(EulerDiscreteScheduler.load_config(where, subfolder="scheduler", **local))
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{where}: cannot read SDXL configs/tokenizers ({str(exc).splitlines()[0][:120]}); point "
            "model.components (--components) at a diffusers SDXL folder"
        ) from exc
    return Architecture(unet, te1, te2, vae, scheduler, *tokenizers, source or where)


def _sgm_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """SGM key -> shape of the UNet and text encoder tensors of ``arch`` (a meta build: no memory)."""
    models = build_models(arch, MODEL_PARTS)
    shapes = {part: {k: tuple(t.shape) for k, t in m.state_dict().items()} for part, m in models.items()}
    plan = plan_from_diffusers({part: list(s) for part, s in shapes.items()})
    return {key: sgm_shape(e, [shapes[e.component][d] for d in e.diffusers]) for key, e in plan.items()}


def _model_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The UNet and text encoder entries of an SGM shape map (what decides the architecture)."""
    prefixes = tuple(SGM_PREFIX[part] for part in MODEL_PARTS)
    return {k: tuple(s) for k, s in shapes.items() if k.startswith(prefixes) and k not in SGM_IGNORED}
