"""Tensor names of SDXL in the original single-file (SGM) layout and in diffusers folders (kohya's LoRA module names
built on them: :mod:`xlbake.lora.names`).

SGM prefixes: UNet ``model.diffusion_model.``, text encoder 1 (CLIP-L, transformers layout)
``conditioner.embedders.0.transformer.``, text encoder 2 (OpenCLIP bigG, open_clip layout with a fused attention
``in_proj``) ``conditioner.embedders.1.model.``, VAE ``first_stage_model.``. The UNet and VAE block indices are
derived from the model's structure (levels, layers per block, which levels have attention), read from the keys
themselves or from a diffusers config, so the same code maps the real SDXL and any smaller model of its architecture.

A :class:`KeyEntry` ties one SGM tensor to the diffusers tensor(s) it is made of and the reshaping between them:
``copy``, ``qkv`` (TE2 ``in_proj`` = rows of q, k, v stacked), ``transpose`` (TE2 ``text_projection``: open_clip
stores ``(hidden, proj)``, diffusers a Linear weight ``(proj, hidden)``), ``conv1x1`` (VAE mid-block attention:
SGM 1x1 conv ``(c, c, 1, 1)``, diffusers Linear ``(c, c)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xlbake.errors import InputError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
SGM_PREFIX = {
    "unet": "model.diffusion_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}
TEXT_MODEL = "text_model."
# SGM tensors with no diffusers counterpart: derived buffers / unused CLIP scale. Dropped when converting.
SGM_IGNORED = frozenset(
    {
        SGM_PREFIX["text_encoder"] + "text_model.embeddings.position_ids",
        SGM_PREFIX["text_encoder_2"] + "logit_scale",
        SGM_PREFIX["text_encoder_2"] + "transformer.text_model.embeddings.position_ids",  # stray key in some saves
    }
)
DIFFUSERS_IGNORED = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})

_RESNET_UNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_RESNET_VAE = (("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."))
_RESNET_VAE += (("conv_shortcut.", "nin_shortcut."),)
_ATTN_VAE = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
_ATTN_VAE_OLD = (("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out."))
_TE2_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_TE2_EXACT = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
    ("text_projection.weight", "text_projection"),
)
_TE2_QKV_D = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_TE2_QKV_S = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_TE2_LAYER_D = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_TE2_LAYER_S = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_VAE_CONV_ATTN = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


@dataclass(frozen=True)
class KeyEntry:
    """One SGM tensor and the diffusers tensor(s) of one component it is built from."""

    sgm: str
    component: str
    diffusers: tuple[str, ...]  # one key; three (q, k, v) for a fused TE2 in_proj
    transform: str  # "copy" | "qkv" | "transpose" | "conv1x1"


@dataclass(frozen=True)
class UnetLayout:
    """The block structure that decides SGM block indices: SGM keeps ``layers_per_block + 1`` slots per level."""

    levels: int
    layers_per_block: int
    down_attn: tuple[bool, ...]  # per level, diffusers down-block order
    up_attn: tuple[bool, ...]  # per level, diffusers up-block order (deepest first)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UnetLayout:
        lpb = config["layers_per_block"]
        if not isinstance(lpb, int):
            if len(set(lpb)) != 1:
                raise InputError(f"UNet config: per-level layers_per_block {lpb} has no SGM layout; use one value")
            lpb = lpb[0]
        down = tuple("CrossAttn" in t for t in config["down_block_types"])
        up = tuple("CrossAttn" in t for t in config["up_block_types"])
        return cls(len(down), lpb, down, up)

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> UnetLayout:
        keys = list(keys)
        levels = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k)))
        lpb = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
        down = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
        up = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels))
        return cls(levels, lpb, down, up)

    @classmethod
    def from_sgm_keys(cls, keys: Iterable[str]) -> UnetLayout:
        """From UNet keys without the ``model.diffusion_model.`` prefix."""
        keys = list(keys)
        inputs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        outputs = {int(m.group(1)) for k in keys if (m := re.match(r"output_blocks\.(\d+)\.", k))}
        ops = sorted(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k)))
        lpb = ops[0] - 1 if ops else max(inputs)
        levels = len(outputs) // (lpb + 1)
        down = tuple(any(k.startswith(f"input_blocks.{1 + i * (lpb + 1)}.1.") for k in keys) for i in range(levels))
        up = tuple(any(k.startswith(f"output_blocks.{i * (lpb + 1)}.1.") for k in keys) for i in range(levels))
        return cls(levels, lpb, down, up)


def unet_prefix_table(layout: UnetLayout) -> dict[str, str]:
    """Diffusers prefix -> SGM prefix (both ending in ".") for every UNet module of ``layout``."""
    n, lpb = layout.levels, layout.layers_per_block
    table = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }

    def resnet(d: str, s: str) -> None:
        table.update({d + dn: s + sn for dn, sn in _RESNET_UNET})

    for i in range(n):
        for j in range(lpb):
            slot = 1 + i * (lpb + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{slot}.0.")
            if layout.down_attn[i]:
                table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{slot}.1."
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."
        for j in range(lpb + 1):
            slot = i * (lpb + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{slot}.0.")
            if layout.up_attn[i]:
                table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{slot}.1."
        if i < n - 1:
            sampler_slot = 2 if layout.up_attn[i] else 1
            table[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (lpb + 1) + lpb}.{sampler_slot}.conv."
    resnet("mid_block.resnets.0.", "middle_block.0.")
    resnet("mid_block.resnets.1.", "middle_block.2.")
    return table


def vae_prefix_table(levels: int, layers_per_block: int, *, aliases: bool = False) -> dict[str, str]:
    """Diffusers prefix -> SGM prefix for an AutoencoderKL; ``aliases`` adds pre-0.14 diffusers attention names."""
    table = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out."):
        table[name] = name
    table.update({"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."})
    attn = _ATTN_VAE + (_ATTN_VAE_OLD if aliases else ())
    for part in ("encoder", "decoder"):
        for r in range(2):
            table.update({f"{part}.mid_block.resnets.{r}.{d}": f"{part}.mid.block_{r + 1}.{s}" for d, s in _RESNET_VAE})
        table.update({f"{part}.mid_block.attentions.0.{d}": f"{part}.mid.attn_1.{s}" for d, s in attn})
    for i in range(levels):
        up = levels - 1 - i  # SGM numbers decoder levels from the lowest resolution
        for j in range(layers_per_block + 1):  # the decoder has one more resnet per level than the encoder
            for d, s in _RESNET_VAE:
                table[f"decoder.up_blocks.{i}.resnets.{j}.{d}"] = f"decoder.up.{up}.block.{j}.{s}"
                if j < layers_per_block:
                    table[f"encoder.down_blocks.{i}.resnets.{j}.{d}"] = f"encoder.down.{i}.block.{j}.{s}"
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    return table


def _lookup(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest prefix of ``key`` found in ``table`` (prefixes end with "."); None when none matches."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix in table:
            return table[prefix] + key[len(prefix) :]
    return None


def _vae_levels(keys: Sequence[str], pattern: str) -> tuple[int, int]:
    levels = 1 + max(int(m.group(1)) for k in keys if (m := re.match(pattern + r"\.(\d+)\.", k)))
    lpb = 1 + max(int(m.group(1)) for k in keys if (m := re.match(pattern + r"\.0\.(?:resnets|block)\.(\d+)\.", k)))
    return levels, lpb


def _te2_to_sgm(key: str) -> tuple[str, str] | None:
    """Diffusers TE2 key (with ``text_model.``) -> (SGM suffix, transform), None when unknown. q/k/v -> in_proj."""
    exact = dict(_TE2_EXACT)
    if key in exact:
        return exact[key], "transpose" if key == "text_projection.weight" else "copy"
    if m := _TE2_QKV_D.match(key):
        return f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}", "qkv"
    if (m := _TE2_LAYER_D.match(key)) and (inner := _lookup(m.group(2), dict(_TE2_LAYER))):
        return f"transformer.resblocks.{m.group(1)}.{inner}", "copy"
    return None


def _te2_from_sgm(suffix: str) -> tuple[tuple[str, ...], str] | None:
    """SGM TE2 suffix -> (diffusers keys, transform), None when unknown."""
    exact = {s: d for d, s in _TE2_EXACT}
    if suffix in exact:
        return (exact[suffix],), "transpose" if suffix == "text_projection" else "copy"
    if m := _TE2_QKV_S.match(suffix):
        base = f"text_model.encoder.layers.{m.group(1)}.self_attn"
        return tuple(f"{base}.{p}_proj.{m.group(2)}" for p in "qkv"), "qkv"
    if (m := _TE2_LAYER_S.match(suffix)) and (inner := _lookup(m.group(2), {s: d for d, s in _TE2_LAYER})):
        return (f"text_model.encoder.layers.{m.group(1)}.{inner}",), "copy"
    return None


def with_text_model(key: str) -> str:
    """A CLIP key in the ``text_model.``-prefixed form (transformers 5 CLIPTextModel drops the prefix)."""
    if key.startswith(TEXT_MODEL) or key.startswith("text_projection"):
        return key
    return TEXT_MODEL + key


def plan_from_diffusers(keys: Mapping[str, Iterable[str]]) -> dict[str, KeyEntry]:
    """SGM key -> entry for the diffusers state-dict keys of each component present (``COMPONENTS`` names).

    Text encoder keys may come with or without ``text_model.``; the entries keep the keys exactly as given.
    Raises InputError naming the first keys that have no SGM name.
    """
    plan: dict[str, KeyEntry] = {}
    unknown: list[str] = []
    for component, comp_keys in keys.items():
        comp_keys = [k for k in comp_keys if k not in DIFFUSERS_IGNORED]
        prefix = SGM_PREFIX[component]
        if component == "unet":
            table = unet_prefix_table(UnetLayout.from_diffusers_keys(comp_keys))
        elif component == "vae":
            table = vae_prefix_table(*_vae_levels(comp_keys, r"encoder\.down_blocks"), aliases=True)
        qkv: dict[str, dict[str, str]] = {}
        for key in comp_keys:
            norm = with_text_model(key)
            if component == "text_encoder":
                ok = re.match(r"text_model\.(embeddings|encoder|final_layer_norm)\.", norm)
                found = (norm, "copy") if ok else None
            elif component == "text_encoder_2":
                found = _te2_to_sgm(norm)
            else:
                sgm = _lookup(key, table)
                conv = sgm is not None and component == "vae" and _VAE_CONV_ATTN.search("." + sgm)
                found = None if sgm is None else (sgm, "conv1x1" if conv else "copy")
            if found is None:
                unknown.append(f"{component}/{key}")
            elif found[1] == "qkv":
                qkv.setdefault(prefix + found[0], {})[_TE2_QKV_D.match(norm).group(2)] = key
            else:
                plan[prefix + found[0]] = KeyEntry(prefix + found[0], component, (key,), found[1])
        for sgm, parts in qkv.items():
            if sorted(parts) != ["k", "q", "v"]:
                unknown.append(f"{component}/{next(iter(parts.values()))} (q, k and v are not all present)")
                continue
            plan[sgm] = KeyEntry(sgm, component, (parts["q"], parts["k"], parts["v"]), "qkv")
    if unknown:
        raise InputError(f"{len(unknown)} diffusers tensor(s) have no SDXL single-file name, e.g. {unknown[:3]}")
    return plan


def plan_from_sgm(keys: Iterable[str]) -> dict[str, KeyEntry]:
    """SGM key -> entry for every key under the four component prefixes (others, e.g. EMA copies, are skipped).

    Text encoder entries name diffusers keys with ``text_model.`` (see :func:`fit_text_model_prefix`).
    Raises InputError naming the first keys under a component prefix that have no diffusers name.
    """
    by_component: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for key in keys:
        for component, prefix in SGM_PREFIX.items():
            if key.startswith(prefix) and key not in SGM_IGNORED:
                by_component[component].append(key[len(prefix) :])
    plan: dict[str, KeyEntry] = {}
    unknown: list[str] = []
    tables: dict[str, dict[str, str]] = {}
    if by_component["unet"]:
        tables["unet"] = {s: d for d, s in unet_prefix_table(UnetLayout.from_sgm_keys(by_component["unet"])).items()}
    if by_component["vae"]:
        levels = _vae_levels(by_component["vae"], r"encoder\.down")
        tables["vae"] = {s: d for d, s in vae_prefix_table(*levels).items()}
    for component, suffixes in by_component.items():
        for suffix in suffixes:
            sgm = SGM_PREFIX[component] + suffix
            if component == "text_encoder":
                found = ((with_text_model(suffix),), "copy")
            elif component == "text_encoder_2":
                found = _te2_from_sgm(suffix)
            else:
                d = _lookup(suffix, tables[component])
                conv = component == "vae" and _VAE_CONV_ATTN.search("." + suffix)
                found = None if d is None else ((d,), "conv1x1" if conv else "copy")
            if found is None:
                unknown.append(sgm)
            else:
                plan[sgm] = KeyEntry(sgm, component, found[0], found[1])
    if unknown:
        raise InputError(f"{len(unknown)} SDXL tensor(s) have no diffusers name, e.g. {unknown[:3]}")
    return plan


def to_sgm(entry: KeyEntry, tensors: Sequence[Tensor]) -> Tensor:
    """The SGM tensor of ``entry`` from its diffusers tensors (in ``entry.diffusers`` order)."""
    if entry.transform == "qkv":
        return torch.cat(list(tensors), dim=0)
    (t,) = tensors
    if entry.transform == "transpose":
        return t.T.contiguous()
    if entry.transform == "conv1x1" and t.ndim == 2:
        return t[:, :, None, None]
    return t


def to_diffusers(entry: KeyEntry, tensor: Tensor) -> tuple[Tensor, ...]:
    """The diffusers tensors of ``entry`` (q, k, v row blocks for ``qkv``) from its SGM tensor."""
    if entry.transform == "qkv":
        if tensor.shape[0] % 3:
            raise InputError(f"{entry.sgm}: fused in_proj has {tensor.shape[0]} rows, not a multiple of 3")
        return tuple(t.contiguous() for t in tensor.chunk(3, dim=0))
    if entry.transform == "transpose":
        return (tensor.T.contiguous(),)
    if entry.transform == "conv1x1":
        return (tensor.reshape(tensor.shape[0], tensor.shape[1]),)
    return (tensor,)


def sgm_shape(entry: KeyEntry, shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The SGM tensor shape of ``entry`` from its diffusers tensor shapes, without loading anything."""
    if entry.transform == "qkv":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    (shape,) = shapes
    if entry.transform == "transpose":
        return (shape[1], shape[0])
    if entry.transform == "conv1x1" and len(shape) == 2:
        return (*shape, 1, 1)
    return tuple(shape)


def _as_state_dict(obj: Mapping[str, Tensor] | torch.nn.Module) -> Mapping[str, Tensor]:
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def sgm_state_dict(
    *,
    unet: Mapping[str, Tensor] | torch.nn.Module | None = None,
    text_encoder: Mapping[str, Tensor] | torch.nn.Module | None = None,
    text_encoder_2: Mapping[str, Tensor] | torch.nn.Module | None = None,
    vae: Mapping[str, Tensor] | torch.nn.Module | None = None,
) -> dict[str, Tensor]:
    """Diffusers state dicts (or models) -> one SGM-keyed state dict. Components left as None are omitted."""
    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    dicts = {c: _as_state_dict(v) for c, v in given.items() if v is not None}
    plan = plan_from_diffusers({c: list(sd) for c, sd in dicts.items()})
    return {k: to_sgm(e, [dicts[e.component][d] for d in e.diffusers]) for k, e in plan.items()}


def diffusers_state_dicts(sgm: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """SGM state dict -> {"unet", "text_encoder", "text_encoder_2", "vae"} diffusers state dicts (present ones).

    Text encoder keys carry ``text_model.``; use :func:`fit_text_model_prefix` for a transformers 5 CLIPTextModel.
    """
    out: dict[str, dict[str, Tensor]] = {}
    for key, entry in plan_from_sgm(sgm).items():
        for name, tensor in zip(entry.diffusers, to_diffusers(entry, sgm[key]), strict=True):
            out.setdefault(entry.component, {})[name] = tensor
    return out


def fit_text_model_prefix(state_dict: Mapping[str, Tensor], model_keys: Iterable[str]) -> dict[str, Tensor]:
    """Add or drop the ``text_model.`` prefix of a CLIP state dict to match a model's own state-dict keys."""
    wants_prefix = any(k.startswith(TEXT_MODEL) for k in model_keys)
    if wants_prefix:
        return {with_text_model(k): v for k, v in state_dict.items()}
    return {k.removeprefix(TEXT_MODEL): v for k, v in state_dict.items()}
