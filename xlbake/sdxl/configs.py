"""The real SDXL base 1.0 architecture as plain dicts, so the full-size models can be built without any download.

Each dict holds constructor arguments only: ``UNet2DConditionModel(**SDXL_UNET_CONFIG)``,
``CLIPTextModel(CLIPTextConfig(**SDXL_TE1_CONFIG))``,
``CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2_CONFIG))``, ``AutoencoderKL(**SDXL_VAE_CONFIG)``,
``EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)``. The values are those of the
``stabilityai/stable-diffusion-xl-base-1.0`` diffusers folder (unet/, text_encoder/, text_encoder_2/, vae/,
scheduler/ config.json). :func:`build_meta_components` builds the four models on the meta device (no memory) for
key/shape planning; parameter counts: UNet 2.567 G, text encoder 1 0.123 G, text encoder 2 0.695 G, VAE 0.084 G.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": (5, 10, 20),
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    # 2816 = 1280 (pooled text embedding of text encoder 2) + 6 time ids * 256 (addition_time_embed_dim)
    "projection_class_embeddings_input_dim": 2816,
    "addition_embed_type_num_heads": 64,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}

# What both SDXL text towers share: 77 tokens, no dropout, the CLIP tokenizer's pad/bos/eos ids.
_CLIP_TEXT_COMMON: dict[str, Any] = {
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# Text encoder 1: OpenAI CLIP ViT-L/14 text tower (CLIPTextModel). bos/eos ids are the ones in SDXL's config.json.
SDXL_TE1_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    **_CLIP_TEXT_COMMON,
}

# Text encoder 2: OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection).
SDXL_TE2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    **_CLIP_TEXT_COMMON,
}

SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

SDXL_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": SDXL_UNET_CONFIG,
    "text_encoder": SDXL_TE1_CONFIG,
    "text_encoder_2": SDXL_TE2_CONFIG,
    "vae": SDXL_VAE_CONFIG,
    "scheduler": SDXL_SCHEDULER_CONFIG,
}


def sdxl_config(name: str) -> dict[str, Any]:
    """A deep copy of one SDXL config ("unet", "text_encoder", "text_encoder_2", "vae" or "scheduler")."""
    return copy.deepcopy(SDXL_CONFIGS[name])


def build_components(
    configs: Mapping[str, Mapping[str, Any]] | None = None, *, meta: bool = True
) -> dict[str, torch.nn.Module]:
    """Build unet, text_encoder, text_encoder_2 and vae from configs (default: real SDXL), on the meta device.

    With ``meta=False`` the weights are really allocated and randomly initialised (only sensible for tiny configs).
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = SDXL_CONFIGS if configs is None else configs

    def build() -> dict[str, torch.nn.Module]:
        return {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
            "vae": AutoencoderKL(**configs["vae"]),
        }

    if not meta:
        return build()
    with init_empty_weights():
        return build()


def build_meta_components() -> dict[str, torch.nn.Module]:
    """The real SDXL unet, text_encoder, text_encoder_2 and vae on the meta device: shapes only, no memory."""
    return build_components(SDXL_CONFIGS, meta=True)


def real_sdxl_sgm_shapes() -> dict[str, tuple[int, ...]]:
    """SGM key -> shape of every tensor of the real SDXL base 1.0 (2513 keys), from the meta-device build."""
    from xlbake.sdxl.keys import plan_from_diffusers, sgm_shape

    shapes = {c: {k: tuple(t.shape) for k, t in m.state_dict().items()} for c, m in build_meta_components().items()}
    plan = plan_from_diffusers({c: list(sd) for c, sd in shapes.items()})
    return {k: sgm_shape(e, [shapes[e.component][d] for d in e.diffusers]) for k, e in plan.items()}
