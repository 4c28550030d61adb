"""kohya's SDXL LoRA module set and names, with diffusers' own kohya-LoRA loader as the oracle."""

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

from xlbake.lora.names import kohya_targets, module_kind
from xlbake.sdxl.configs import build_meta_components, real_sdxl_sgm_shapes
from xlbake.sdxl.keys import SGM_PREFIX, sgm_state_dict
from xlbake.sdxl.tiny import build_tiny_components

TE2_PREFIX = SGM_PREFIX["text_encoder_2"]


@pytest.fixture(scope="module")
def real():
    """The real SDXL models on the meta device and their SGM key -> shape set."""
    return build_meta_components(), real_sdxl_sgm_shapes()


def test_module_kind_of_weights_and_factors():
    assert module_kind((8, 4)) == "linear"
    assert module_kind((8, 4, 1, 1)) == "conv1x1"
    assert module_kind((2, 4, 3, 3)) == "conv3x3"


def test_kohya_module_set_on_real_sdxl(real):
    shapes = real[1]
    linear, with_conv = kohya_targets(shapes, conv=False), kohya_targets(shapes, conv=True)
    assert (len(linear), len(with_conv)) == (986, 1052)
    count = {c: sum(t.component == c for t in with_conv) for c in ("unet", "te1", "te2")}
    assert count == {"unet": 788, "te1": 72, "te2": 192}
    assert sum(t.kind == "conv3x3" for t in with_conv) == 38 and all(t.kind != "conv3x3" for t in linear)
    by_name = {t.name: t for t in with_conv}
    assert len(by_name) == 1052
    q = by_name["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]
    assert (q.key, q.rows, q.shape) == (
        TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight",
        (2560, 3840),
        (1280, 1280),
    )
    ff = by_name["lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"]
    assert (ff.kind, ff.shape) == ("linear", (8 * 640, 640))  # GEGLU: 2 x 4C
    assert by_name["lora_unet_input_blocks_4_0_skip_connection"].kind == "conv1x1"
    expected = "middle_block_1_proj_in output_blocks_2_2_conv input_blocks_3_0_op input_blocks_1_0_in_layers_2"
    assert all(f"lora_unet_{name}" in by_name for name in expected.split())
    assert "lora_te1_text_model_encoder_layers_11_mlp_fc2" in by_name
    extra = {t.name for t in kohya_targets(shapes, conv=True, extra=True)} - set(by_name)
    expected = "input_blocks_0_0 out_2 time_embed_0 time_embed_2 label_emb_0_0 label_emb_0_2"
    assert extra == {f"lora_unet_{name}" for name in expected.split()}
    assert len(kohya_targets(shapes, conv=False, extra=True)) == 986 + 4  # 3x3 conv_in/out only with a conv dim


def diffusers_modules_of(names: list[str], unet_config) -> dict[str, tuple[str, str]]:
    """Where diffusers' own kohya-LoRA loader puts each module name: name -> (component, diffusers module path)."""
    sd = {}
    for i, name in enumerate(names):  # the down tensor's value tags the name through the conversion
        sd[f"{name}.lora_down.weight"] = torch.tensor([float(i)])
        sd[f"{name}.lora_up.weight"] = torch.tensor([-1.0])
    sd, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sd, unet_config))
    by_component: dict[str, dict] = {}
    for key, value in sd.items():
        component, rest = key.split(".", 1)
        by_component.setdefault(component, {})[rest] = value
    found = {}
    for component, state in by_component.items():
        peft = convert_unet_state_dict_to_peft(state) if component == "unet" else None
        peft = peft if peft is not None else convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        for key, value in peft.items():
            if value.item() >= 0:
                found[names[int(value.item())]] = (component, key.split(".lora_")[0])
    return found


@pytest.mark.parametrize("which", ["real", "small"])
def test_kohya_names_load_where_diffusers_puts_them(which, real):
    """Each name, run through diffusers' kohya-LoRA conversion, is a module whose weight has the target's shape."""
    if which == "real":
        models, shapes = real
    else:
        tiny = build_tiny_components()
        models = {component: tiny[component] for component in SGM_PREFIX}
        shapes = {k: tuple(v.shape) for k, v in sgm_state_dict(**models).items()}
    params = {c: dict(m.named_parameters()) for c, m in models.items()}
    targets = kohya_targets(shapes, conv=True, extra=True)
    where = diffusers_modules_of([t.name for t in targets], models["unet"].config)
    assert len(where) == len(targets) == len({*where.values()})
    for target in targets:
        component, module = where[target.name]
        weights = params[component]
        weight = weights.get(f"{module}.weight", weights.get(f"{module.removeprefix('text_model.')}.weight"))
        assert weight is not None and tuple(weight.shape) == target.shape, target.name
