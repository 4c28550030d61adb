"""SGM <-> diffusers key naming, with diffusers' own converters as the oracle."""

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)

from xlbake.errors import InputError
from xlbake.sdxl.configs import SDXL_CONFIGS, build_components, build_meta_components, real_sdxl_sgm_shapes
from xlbake.sdxl.keys import (
    SGM_IGNORED,
    SGM_PREFIX,
    UnetLayout,
    diffusers_state_dicts,
    fit_text_model_prefix,
    plan_from_diffusers,
    plan_from_sgm,
    sgm_state_dict,
)

TE2_PREFIX = SGM_PREFIX["text_encoder_2"]
CLIP = dict(
    vocab_size=100, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16
)
CLIP.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)


def small_configs(variant: str) -> dict[str, dict]:
    """A small model of SDXL's architecture; "sdxl" has its block layout, "odd" another one (lpb 1, 3 levels)."""
    unet = dict(SDXL_CONFIGS["unet"], sample_size=8, norm_num_groups=8, cross_attention_dim=64)
    unet.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    if variant == "sdxl":
        unet.update(block_out_channels=(32, 64), transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4))
        unet.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))
        unet.update(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        unet.update(block_out_channels=(16, 32, 32), layers_per_block=1, transformer_layers_per_block=(1, 1, 2))
        unet.update(attention_head_dim=(2, 2, 4))
        unet.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"))
        unet.update(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
    te1 = dict(CLIP, hidden_size=32, projection_dim=32, hidden_act="quick_gelu")
    te2 = dict(CLIP, hidden_size=32, projection_dim=16, hidden_act="gelu")
    vae = dict(SDXL_CONFIGS["vae"], block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae.update(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return {"unet": unet, "text_encoder": te1, "text_encoder_2": te2, "vae": vae}


def small_models(variant: str = "sdxl", seed: int = 0) -> dict[str, torch.nn.Module]:
    """Small models with every weight random (so that a swapped tensor cannot go unnoticed)."""
    torch.manual_seed(seed)
    models = build_components(small_configs(variant), meta=False)
    with torch.no_grad():
        for model in models.values():
            for p in model.parameters():
                p.normal_()
    return models


def oracle_diffusers(sgm: dict, configs: dict, te2_model) -> dict[str, dict]:
    """SGM -> diffusers by diffusers' own single-file conversion."""
    return {
        "unet": convert_ldm_unet_checkpoint(sgm, configs["unet"]),
        "text_encoder": convert_ldm_clip_checkpoint(sgm),
        "text_encoder_2": convert_open_clip_checkpoint(te2_model, sgm, prefix=TE2_PREFIX),
        "vae": convert_ldm_vae_checkpoint(sgm, configs["vae"]),
    }


def assert_same_state(got: dict, want: dict, *, values: bool) -> None:
    got = fit_text_model_prefix(got, want) if any("encoder.layers." in k for k in want) else got
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert tuple(got[key].shape) == tuple(tensor.shape), key
        if values:
            assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def real():
    """The real SDXL models on the meta device and their SGM key -> shape set."""
    return build_meta_components(), real_sdxl_sgm_shapes()


def test_real_sdxl_configs_build_with_the_published_sizes(real):
    from diffusers import EulerDiscreteScheduler

    params = {c: sum(p.numel() for p in m.parameters()) for c, m in real[0].items()}
    assert round(params["unet"] / 1e9, 3) == 2.567
    assert round(params["text_encoder"] / 1e9, 3) == 0.123
    assert round(params["text_encoder_2"] / 1e9, 3) == 0.695
    assert all(p.device.type == "meta" for m in real[0].values() for p in m.parameters())
    assert EulerDiscreteScheduler(**SDXL_CONFIGS["scheduler"]).config.timestep_spacing == "leading"


@pytest.mark.parametrize("variant", ["sdxl", "odd"])
def test_round_trip_against_diffusers_single_file_conversion(variant):
    models, configs = small_models(variant), small_configs(variant)
    states = {c: m.state_dict() for c, m in models.items()}
    sgm = sgm_state_dict(**models)  # diffusers -> SGM by us
    oracle = oracle_diffusers(sgm, configs, models["text_encoder_2"])  # SGM -> diffusers by diffusers
    ours = diffusers_state_dicts(sgm)
    for component, state in states.items():
        assert_same_state(oracle[component], state, values=True)
        assert_same_state(ours[component], state, values=True)
        models[component].load_state_dict(fit_text_model_prefix(ours[component], state), strict=True)
    assert sgm_state_dict(**ours).keys() == sgm.keys()


def test_sgm_names_follow_the_original_layout():
    sgm = sgm_state_dict(**small_models("sdxl"))
    shapes = {k: tuple(v.shape) for k, v in sgm.items()}
    # lpb 2 -> 3 SGM slots per level: level 1 starts at input_blocks.4, its downsampler would be input_blocks.6
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in sgm
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in sgm
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sgm
    assert "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight" in sgm
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"] == (96, 32)
    assert shapes[TE2_PREFIX + "text_projection"] == (32, 16)  # open_clip (hidden, proj); diffusers (proj, hidden)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (16, 16, 1, 1)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in sgm  # decoder levels count from the bottom
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sgm


def test_odd_layout_upsampler_without_attention():
    sgm = sgm_state_dict(**small_models("odd"))
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in sgm  # level with attention: slot 2
    assert "model.diffusion_model.output_blocks.3.1.conv.weight" in sgm  # level without: slot 1
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sgm


def test_text_encoders_with_and_without_text_model_prefix():
    models = small_models("sdxl")
    te1, te2 = models["text_encoder"].state_dict(), models["text_encoder_2"].state_dict()
    assert not any(k.startswith("text_model.") for k in te1)  # transformers 5 CLIPTextModel
    with_prefix = {"text_model." + k: v for k, v in te1.items()}
    without_prefix = {k.removeprefix("text_model."): v for k, v in te2.items()}
    a = sgm_state_dict(text_encoder=te1, text_encoder_2=te2)
    b = sgm_state_dict(text_encoder=with_prefix, text_encoder_2=without_prefix)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fit_text_model_prefix(with_prefix, te1.keys()).keys() == te1.keys()


def test_layout_from_config_keys_and_sgm_agree(real):
    for configs, models in ((small_configs("odd"), small_models("odd")), (SDXL_CONFIGS, real[0])):
        unet_keys = list(models["unet"].state_dict())
        sgm_keys = [k.removeprefix(SGM_PREFIX["unet"]) for k in sgm_state_dict(unet=models["unet"])]
        layout = UnetLayout.from_config(configs["unet"])
        assert layout == UnetLayout.from_diffusers_keys(unet_keys) == UnetLayout.from_sgm_keys(sgm_keys)
    assert UnetLayout.from_config(SDXL_CONFIGS["unet"]) == UnetLayout(3, 2, (False, True, True), (True, True, False))


def test_real_sdxl_every_key_maps(real):
    models, shapes = real
    states = {c: m.state_dict() for c, m in models.items()}
    counts = {c: sum(k.startswith(p) for k in shapes) for c, p in SGM_PREFIX.items()}
    # 1680 + 196 + 389 + 248 = 2513; sd_xl_base_1.0.safetensors has 2515: + TE1 position_ids + TE2 logit_scale
    assert counts == {"unet": 1680, "text_encoder": 196, "text_encoder_2": 389, "vae": 248}
    in_real_file = {SGM_PREFIX["text_encoder"] + "text_model.embeddings.position_ids", TE2_PREFIX + "logit_scale"}
    assert in_real_file <= SGM_IGNORED and len(shapes) + len(in_real_file) == 2515
    plan = plan_from_sgm(list(shapes) + sorted(in_real_file))  # no unmapped key (it would raise)
    mapped = {c: set() for c in states}
    for entry in plan.values():
        mapped[entry.component].update(entry.diffusers)
    for component, state in states.items():
        want = fit_text_model_prefix(dict.fromkeys(state), ["text_model."]) if "text" in component else state
        assert mapped[component] == set(want)
    sgm = sgm_state_dict(**models)  # meta tensors: names and shapes through diffusers' converter too
    oracle = oracle_diffusers(sgm, SDXL_CONFIGS, models["text_encoder_2"])
    for component, state in states.items():
        assert_same_state(oracle[component], state, values=False)
    assert infer_diffusers_model_type(sgm) == "xl_base"


def test_unknown_names_are_refused():
    with pytest.raises(InputError, match="down_blocks.0.mystery"):
        plan_from_diffusers(
            {"unet": ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.mystery"]}
        )
    with pytest.raises(InputError, match="model.diffusion_model.nonsense.weight"):
        plan_from_sgm(
            ["model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "model.diffusion_model.nonsense.weight"]
        )
    with pytest.raises(InputError, match="q, k and v"):
        plan_from_diffusers({"text_encoder_2": ["text_model.encoder.layers.0.self_attn.q_proj.weight"]})
