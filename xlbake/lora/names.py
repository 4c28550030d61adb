"""kohya's SDXL LoRA module set and names, on the SGM tensor names of :mod:`xlbake.sdxl.keys`.

As sd-scripts' networks/lora.py builds them on its SGM-named SDXL UNet: every Linear/Conv2d inside
Transformer2DModel always; inside ResnetBlock2D/Downsample2D/Upsample2D only with a conv dim (1x1 convs and Linears
there take the linear dim, 3x3 convs the conv dim); CLIPAttention/CLIPMLP linears of both text encoders. A module's
name is ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` and the module's path with dots as underscores (SGM paths in
the UNet, transformers CLIP paths in both text encoders); TE2's fused ``in_proj`` gives three modules (q, k, v), each
a row block of the one weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from xlbake.sdxl.keys import SGM_PREFIX, with_text_model

_UNET_TRANSFORMER = re.compile(
    r"^((?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.(?:proj_in|proj_out|transformer_blocks\.\d+\..+))"
    r"\.weight$"
)
_UNET_CONV_SET = re.compile(
    r"^((?:input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\."
    r"(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv)\.weight$"
)
_UNET_EXTRA = ("input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2")
_TE_MODULE = r"encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
_TE1_TARGET = re.compile(r"^(text_model\." + _TE_MODULE + r")\.weight$")
_TE2_TARGET = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj|attn\.in_proj)[._]weight$"
)
_TE2_NAMES = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


@dataclass(frozen=True)
class LoraTarget:
    """One kohya LoRA module: its name, the SGM weight it adapts, and the row block of a fused weight."""

    name: str  # kohya name, e.g. lora_te2_text_model_encoder_layers_0_self_attn_q_proj
    component: str  # "unet" | "te1" | "te2"
    key: str  # SGM key of the weight
    rows: tuple[int, int] | None  # row block [start, stop) of a fused weight (TE2 q/k/v), else None
    kind: str  # "linear" | "conv1x1" | "conv3x3"
    shape: tuple[int, ...]  # shape of the (sliced) weight


def module_kind(shape: Sequence[int]) -> str:
    """``linear``, ``conv1x1`` or ``conv3x3`` (any kernel larger than 1x1) for a weight or factor shape."""
    if len(shape) == 2:
        return "linear"
    return "conv1x1" if tuple(shape[2:]) == (1, 1) else "conv3x3"


def _unet_target(suffix: str, shape: tuple[int, ...], conv: bool, extra: bool) -> tuple[str, str] | None:
    """(module path, kind) when the UNet weight ``suffix`` belongs to kohya's set, else None."""
    if len(shape) < 2:
        return None  # norms
    module = suffix.removesuffix(".weight")
    m = _UNET_TRANSFORMER.match(suffix) or (conv and _UNET_CONV_SET.match(suffix))
    if not m and not (extra and module in _UNET_EXTRA and suffix.endswith(".weight")):
        return None
    kind = module_kind(shape)
    return (module, kind) if conv or kind != "conv3x3" else None


def kohya_targets(shapes: Mapping[str, Sequence[int]], *, conv: bool, extra: bool = False) -> list[LoraTarget]:
    """kohya's SDXL LoRA modules for an SGM-keyed checkpoint (key -> shape of every tensor), in key order.

    ``conv=False``: transformer linears and text encoders (986 modules on real SDXL); ``conv=True`` adds the ResNet
    convs, their time-embedding and skip layers and the down/up samplers (1052). ``extra=True`` adds the layers
    kohya leaves out, named like the rest (``lora_unet_time_embed_0``, ``lora_unet_label_emb_0_0``, and with ``conv``
    the 3x3 ``lora_unet_input_blocks_0_0`` = conv_in and ``lora_unet_out_2`` = conv_out).
    """
    targets: list[LoraTarget] = []
    for key, shape in shapes.items():
        shape = tuple(shape)
        if key.startswith(SGM_PREFIX["unet"]):
            found = _unet_target(key[len(SGM_PREFIX["unet"]) :], shape, conv, extra)
            if found:
                name = "lora_unet_" + found[0].replace(".", "_")
                targets.append(LoraTarget(name, "unet", key, None, found[1], shape))
        elif key.startswith(SGM_PREFIX["text_encoder"]):
            m = _TE1_TARGET.match(with_text_model(key[len(SGM_PREFIX["text_encoder"]) :]))
            if m and len(shape) == 2:
                targets.append(
                    LoraTarget("lora_te1_" + m.group(1).replace(".", "_"), "te1", key, None, "linear", shape)
                )
        elif key.startswith(SGM_PREFIX["text_encoder_2"]):
            m = _TE2_TARGET.match(key[len(SGM_PREFIX["text_encoder_2"]) :])
            if not m or len(shape) != 2:
                continue
            base = f"lora_te2_text_model_encoder_layers_{m.group(1)}_"
            if m.group(2) != "attn.in_proj":
                targets.append(LoraTarget(base + _TE2_NAMES[m.group(2)], "te2", key, None, "linear", shape))
                continue
            rows = shape[0] // 3
            for i, part in enumerate("qkv"):
                block = (i * rows, (i + 1) * rows)
                targets.append(
                    LoraTarget(f"{base}self_attn_{part}_proj", "te2", key, block, "linear", (rows, shape[1]))
                )
    return targets
