"""Load the SDXL base for training and decide what trains.

A single-file base (SGM keys) is read through ``xlbake.sdxl.checkpoint`` and converted to diffusers state dicts, which
are loaded into models built from its architecture (``xlbake.sdxl.models``: the configs of ``model.components``,
or by default SDXL base 1.0's or the tiny model's, recognised from the file's shapes). A diffusers-folder base is
loaded directly. The only download: SDXL's two tokenizers for a real single file, into the Hugging Face cache on
first use (never with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from finetune.config import SDXL_HUB_ID, ModelConfig, OptimConfig, PrecisionConfig, builtin_name
from finetune.optim import ParamGroup
from xlbake.errors import ConfigError, InputError
from xlbake.sdxl.parts import PART_ATTRS

if TYPE_CHECKING:
    from xlbake.sdxl.models import Architecture

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}
DEMO_DONE = ".complete"
"""Marker written after the builtin demo dataset is fully drawn."""


@dataclass(frozen=True)
class SdxlModel:
    """The loaded SDXL components (diffusers/transformers modules) and where they came from."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    base: Path

    def part(self, name: str) -> torch.nn.Module:
        """The module of a trainable part: "unet", "te1" or "te2"."""
        return getattr(self, PART_ATTRS[name])


def load_model(base: Path, components: str | Path, vae: Path | None = None, prediction: str | None = None) -> SdxlModel:
    """Load an SDXL base in fp32: a diffusers folder, or a single-file SGM safetensors whose architecture comes from
    ``components`` (a diffusers folder or hub id), or with the default components from its own tensor shapes
    (SDXL base 1.0 or the builtin tiny model, see ``xlbake.sdxl.models``).

    ``prediction`` ("epsilon" | "v_prediction") replaces the noise scheduler's prediction type: the trained model's,
    which the saved diffusers folder and the samples must use.

    InputError when the base is missing, not SDXL, or does not fit the component configs.
    """
    base = Path(base)
    if not base.exists():
        raise InputError(f"{base}: base model not found; set model.base to an SDXL .safetensors or diffusers folder")
    if base.is_dir():
        tokenizer = _from_pretrained(CLIPTokenizer, base, "tokenizer")
        tokenizer_2 = _from_pretrained(CLIPTokenizer, base, "tokenizer_2")
        noise_scheduler = _from_pretrained(DDPMScheduler, base, "scheduler")
        unet = _from_pretrained(UNet2DConditionModel, base, "unet", torch_dtype=torch.float32)
        te1 = _from_pretrained(CLIPTextModel, base, "text_encoder", dtype=torch.float32)
        te2 = _from_pretrained(CLIPTextModelWithProjection, base, "text_encoder_2", dtype=torch.float32)
        vae_model = _from_pretrained(AutoencoderKL, base, "vae", torch_dtype=torch.float32)
    else:
        arch = single_file_architecture(base, components)
        tokenizer, tokenizer_2 = arch.tokenizer, arch.tokenizer_2
        noise_scheduler = DDPMScheduler.from_config(_accepted(DDPMScheduler, arch.scheduler))
        unet, te1, te2, vae_model = _load_single_file(base, arch)
    if prediction is not None:
        noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, prediction_type=prediction)
    if vae is not None:
        vae_model = _from_pretrained(AutoencoderKL, vae, None, torch_dtype=torch.float32)
    return SdxlModel(unet, te1, te2, vae_model, tokenizer, tokenizer_2, noise_scheduler, base)


def single_file_architecture(base: Path, components: str | Path) -> Architecture:
    """The architecture of a single-file base: from ``components``, or with the default (SDXL's hub id) from the
    file's own shapes, SDXL's tokenizers fetched on first use. InputError when it cannot be had."""
    from xlbake.sdxl.models import resolve_architecture

    return resolve_architecture(base, None if str(components) == SDXL_HUB_ID else components)


def _accepted(cls: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a scheduler config ``cls`` takes (SDXL's is EulerDiscreteScheduler's: diffusers warns on the
    rest)."""
    return {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters}


def _load_single_file(base: Path, arch: Architecture) -> tuple[Any, Any, Any, Any]:
    from xlbake.sdxl.checkpoint import open_checkpoint
    from xlbake.sdxl.keys import diffusers_state_dicts, fit_text_model_prefix
    from xlbake.sdxl.models import build_models

    models = build_models(arch, ("unet", "text_encoder", "text_encoder_2", "vae"))
    with open_checkpoint(base) as reader:
        tensors = {key: reader.get(key) for key in reader.keys()}  # noqa: SIM118 (a reader, not a dict)
    parts = diffusers_state_dicts(tensors)
    for name, module in models.items():
        state = parts.get(name, {})
        if name.startswith("text_encoder"):
            state = fit_text_model_prefix(state, module.state_dict())
        _assign_state_dict(module, state, base, name)
    return models["unet"], models["text_encoder"], models["text_encoder_2"], models["vae"]


def _assign_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], base: Path, name: str) -> None:
    """Load ``state`` into a meta-device module as fp32; InputError naming the first missing/unexpected key."""
    expected = set(module.state_dict())
    persistent = {k for k in expected if not k.endswith("position_ids")}
    missing, unexpected = sorted(persistent - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise InputError(
            f"{base}: {name} does not match model.components ({what}, {len(missing)} missing, "
            f"{len(unexpected)} unexpected); point model.components at the base's architecture"
        )
    # Copies: split fused tensors (TE2 q/k/v) are views of one storage, which state saving would deduplicate.
    fp32 = {k: v.to(torch.float32, copy=True) for k, v in state.items()}
    module.load_state_dict(fp32, strict=False, assign=True)
    for buffer_name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (position ids) are rebuilt by the module's own init
            raise InputError(f"{base}: {name}.{buffer_name} was not initialised; report this as a bug")


def _from_pretrained(cls: Any, source: str | Path, subfolder: str | None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` from a local diffusers folder (the base, or model.vae), never the network."""
    options: dict[str, Any] = {"local_files_only": True, **kwargs}
    if subfolder:
        options["subfolder"] = subfolder
    try:
        return cls.from_pretrained(str(source), **options)
    except (OSError, ValueError) as exc:
        where = f"{source}/{subfolder}" if subfolder else str(source)
        raise InputError(
            f"{where}: cannot load {cls.__name__} ({str(exc).splitlines()[0][:160]}); is it a complete diffusers "
            "SDXL folder?"
        ) from exc


def unreachable_parameters(model: SdxlModel) -> dict[str, list[str]]:
    """Parameters of each text encoder that the SDXL conditioning cannot give a gradient, by part.

    SDXL conditions on TE1's penultimate hidden state, so TE1's last encoder layer and final layer norm never see
    a gradient. TE2 also gives its penultimate hidden state, but its pooled output (final layer norm + text
    projection at the end token) runs through the last layer, so all of TE2 receives gradient.
    """
    last = model.text_encoder.config.num_hidden_layers - 1
    dead = re.compile(rf"(^|\.)(encoder\.layers\.{last}\.|final_layer_norm\.)")
    names = [n for n, _ in model.text_encoder.named_parameters() if dead.search(n)]
    return {"te1": names, "te2": []}


def setup_trainable(
    model: SdxlModel, model_cfg: ModelConfig, optim: OptimConfig, precision: PrecisionConfig
) -> list[ParamGroup]:
    """Freeze what does not train, set dtypes, modes, attention and checkpointing; return the param groups.

    Trained parts keep fp32 master weights (bf16 with full_bf16); frozen parts run in the mixed-precision dtype;
    the VAE is always frozen, in fp32 unless an fp16-fixed VAE is configured.
    """
    train_dtype = torch.bfloat16 if precision.full_bf16 else torch.float32
    frozen_dtype = DTYPES[precision.mixed]
    _cast(model.vae.requires_grad_(False).eval(), DTYPES[precision.vae])
    dead = unreachable_parameters(model)
    groups = []
    for name, lr in optim.part_lrs.items():
        module = model.part(name)
        module.requires_grad_(lr > 0)
        module.train(lr > 0)
        _cast(module, train_dtype if lr > 0 else frozen_dtype)
        _set_attention(module, model_cfg.attention)
        if lr == 0:
            continue
        frozen = set(dead.get(name, []))
        for param_name, param in module.named_parameters():
            param.requires_grad_(param_name not in frozen)
        if frozen:
            logger.info("%s: %d parameters frozen (no gradient path in SDXL): %s", name, len(frozen), _summary(frozen))
        if model_cfg.gradient_checkpointing:
            _enable_checkpointing(module)
        groups.append(ParamGroup(name, [p for p in module.parameters() if p.requires_grad], lr))
    return groups


def frozen_base_weights(model: SdxlModel, optim: OptimConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of the parts that do not train (LR 0), as loaded: part name -> fp32 tensors on the CPU.

    A frozen part runs in the mixed-precision dtype, and its outputs must hold these instead: saved from the
    16-bit copy, the rounding would differ from the base and extraction would take it for a finetune. Call before
    ``setup_trainable``: its cast gives the modules new tensors, so these are kept without a copy (host RAM).
    """
    return {name: model.part(name).state_dict() for name, lr in optim.part_lrs.items() if lr == 0}


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast only when needed (diffusers warns on every dtype cast)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def _set_attention(module: torch.nn.Module, attention: str) -> None:
    if isinstance(module, UNet2DConditionModel):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    else:
        module.set_attn_implementation(attention)


def _enable_checkpointing(module: torch.nn.Module) -> None:
    if isinstance(module, UNet2DConditionModel):
        module.enable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _summary(names: set[str]) -> str:
    roots = sorted({".".join(n.split(".")[:4]) for n in names})
    return ", ".join(roots)


@dataclass(frozen=True)
class Inputs:
    """The base model and dataset roots a run reads, with builtins materialised."""

    base: Path
    components: str | Path
    roots: tuple[Path, ...]


def resolve_inputs(base: Path, components: str, roots: tuple[Path, ...], builtin_dir: Path) -> Inputs:
    """Replace `builtin:tiny` (model) and `builtin:demo` (data root) by files built offline into ``builtin_dir``.

    They are created on first use (seconds) and reused afterwards, so a resumed run reads the same files.
    """
    name = builtin_name(base)
    if name is not None:
        if name != "tiny":
            raise ConfigError(f"model.base: unknown builtin model {name!r}; the builtin model is builtin:tiny")
        base, components = _builtin_tiny(builtin_dir / "tiny")
    resolved = []
    for root in roots:
        kind = builtin_name(root)
        if kind is None:
            resolved.append(root)
        elif kind == "demo":
            resolved.append(_builtin_demo(builtin_dir / "demo"))
        else:
            raise ConfigError(f"data.roots: unknown builtin dataset {kind!r}; the builtin dataset is builtin:demo")
    return Inputs(Path(base), components, tuple(resolved))


def _builtin_tiny(folder: Path) -> tuple[Path, Path]:
    from xlbake.sdxl.tiny import DIFFUSERS_SUBDIR, SINGLE_FILE_NAME, save_tiny

    single_file, diffusers_dir = folder / SINGLE_FILE_NAME, folder / DIFFUSERS_SUBDIR
    if not single_file.exists():  # written last by save_tiny: its absence means not (completely) built
        logger.info("building the builtin tiny model in %s", folder)
        save_tiny(folder, force=True)
    return single_file, diffusers_dir


def _builtin_demo(folder: Path) -> Path:
    from xlbake.data.demo import make_demo_dataset

    done = folder.with_name(folder.name + DEMO_DONE)
    if not done.exists():
        logger.info("drawing the builtin demo dataset in %s", folder)
        make_demo_dataset(folder, force=True)
        done.touch()
    return folder
