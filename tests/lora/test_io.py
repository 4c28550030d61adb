"""kohya LoRA file I/O: round trip, one alpha with folded scales, metadata, data hash, refusal of other formats."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xlbake.errors import InputError, OutputError
from xlbake.lora.io import (
    HASH_KEY,
    LoraModule,
    lora_kind_of,
    lora_metadata,
    module_component,
    read_lora,
    write_lora,
)
from xlbake.sdxl.tensorfile import safetensors_data_hash

# name -> (up shape, down shape); ranks differ per module on purpose.
SHAPES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ((24, 4), (4, 16)),
    "lora_unet_input_blocks_1_0_in_layers_2": ((12, 3, 1, 1), (3, 10, 3, 3)),
    "lora_unet_input_blocks_4_0_skip_connection": ((20, 2, 1, 1), (2, 12, 1, 1)),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((16, 8), (8, 16)),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ((32, 5), (5, 16)),
}
REL_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_factors(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(up, generator=gen), torch.randn(down, generator=gen)) for name, (up, down) in SHAPES.items()
    }


def product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (up.double().flatten(1) @ down.double().flatten(1)).reshape(up.shape[0], *down.shape[1:])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def data_section(path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def meta(**extra: str) -> dict[str, str]:
    ranks = {name: down[0] for name, (_, down) in SHAPES.items()}
    return lora_metadata(title="unit", ranks=ranks, alpha=8.0, conv_rank=3, extra=extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_every_delta(tmp_path, dtype):
    factors = make_factors()
    out = write_lora(tmp_path / "l.safetensors", factors, metadata=meta(), dtype=dtype)
    lora = read_lora(out)
    assert set(lora.modules) == set(factors)
    for name, (up, down) in factors.items():
        module = lora.modules[name]
        assert module.up.shape == up.shape and module.down.shape == down.shape
        assert module.up.dtype == dtype and module.rank == down.shape[0]
        assert rel_err(module.delta(), product(up, down)) < REL_TOL[dtype], name
    assert {m.kind for m in lora.modules.values()} == {"linear", "conv1x1", "conv3x3"}


@pytest.mark.parametrize("alpha", [None, 1.0, 0.3])
def test_one_alpha_for_all_modules_with_scale_folded(tmp_path, alpha):
    factors = make_factors(1)
    out = write_lora(tmp_path / "l.safetensors", factors, metadata={}, dtype=torch.float16, alpha=alpha)
    with safe_open(str(out), framework="pt") as handle:
        alphas = [handle.get_tensor(k) for k in list(handle.keys()) if k.endswith(".alpha")]
    assert len(alphas) == len(factors)
    assert all(a.ndim == 0 and a.dtype == torch.float16 for a in alphas)
    assert len({float(a) for a in alphas}) == 1
    expected = 8.0 if alpha is None else float(torch.tensor(alpha, dtype=torch.float16))  # default: largest rank
    assert float(alphas[0]) == expected
    lora = read_lora(out)
    for name, (up, down) in factors.items():
        assert rel_err(lora.modules[name].delta(), product(up, down)) < REL_TOL[torch.float16]


def test_two_dimensional_up_for_conv_is_stored_as_1x1(tmp_path):
    up, down = torch.randn(6, 2), torch.randn(2, 4, 3, 3)
    out = write_lora(
        tmp_path / "c.safetensors", {"lora_unet_out_layers_3": (up, down)}, metadata={}, dtype=torch.float32
    )
    module = read_lora(out).modules["lora_unet_out_layers_3"]
    assert module.up.shape == (6, 2, 1, 1)
    assert rel_err(module.delta(), product(up, down)) < 1e-6


def test_metadata_keys_are_kohya_strings():
    md = meta(ss_training_comment="hello")
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"  # linear ranks 2,4,5,8 vary
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "8.0"}
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.resolution"] == "1024x1024"
    assert md["ss_output_name"] == md["modelspec.title"] == "unit"
    assert md["ss_training_comment"] == "hello"


def test_metadata_fixed_rank_without_convs():
    md = lora_metadata(title="t", ranks={"lora_unet_a": 16, "lora_te1_b": 16}, alpha=16, conv_rank=None)
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_network_args"]) == ("16", "16.0", "{}")
    md = lora_metadata(title="t", ranks={"lora_unet_a": 16, "lora_unet_c": 8}, alpha=16, conv_rank=8)
    assert md["ss_network_dim"] == "16" and json.loads(md["ss_network_args"])["conv_dim"] == "8"
    with pytest.raises(ValueError, match="must be a string"):
        lora_metadata(title="t", ranks={"lora_unet_a": 4}, alpha=4, conv_rank=None, extra={"x": 1})


def test_metadata_prediction_type_follows_the_argument():
    """kohya's modelspec convention for LoRAs: epsilon or v (sd-scripts' sai_model_spec)."""
    ranks = {"lora_unet_a": 4}
    assert lora_metadata(title="t", ranks=ranks, alpha=4, conv_rank=None)["modelspec.prediction_type"] == "epsilon"
    v = lora_metadata(title="t", ranks=ranks, alpha=4, conv_rank=None, prediction="v_prediction")
    assert v["modelspec.prediction_type"] == "v"


def test_written_metadata_and_hash(tmp_path):
    factors = make_factors(2)
    md = meta() | {"lora_adapter_metadata": "{}", HASH_KEY: "stale", "sshs_legacy_hash": "stale"}
    first = write_lora(tmp_path / "a.safetensors", factors, metadata=md)
    header = read_lora(first).metadata
    assert "lora_adapter_metadata" not in header and "sshs_legacy_hash" not in header
    assert all(header[k] == v for k, v in meta().items() if k != "modelspec.date")
    assert header[HASH_KEY] == hashlib.sha256(data_section(first)).hexdigest()
    assert header[HASH_KEY] == safetensors_data_hash(first)
    # The hash covers the tensor data only: other metadata, same data, same hash.
    second = write_lora(tmp_path / "b.safetensors", factors, metadata={"ss_output_name": "other"})
    assert data_section(second) == data_section(first)
    assert read_lora(second).metadata[HASH_KEY] == header[HASH_KEY]


def test_metadata_is_kept_as_plain_text(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"lora_unet_a.lora_down.weight": torch.ones(1, 2), "lora_unet_a.lora_up.weight": torch.ones(2, 1)}
    hostile = {"ss_tag_frequency": "{not json", "x": "__import__('os').system('false')"}
    save_file(tensors, str(path), metadata=hostile)
    assert read_lora(path).metadata == hostile
    with pytest.raises(OutputError, match="ss_tag_frequency"):
        write_lora(tmp_path / "o.safetensors", {"lora_unet_a": (torch.ones(2, 1), torch.ones(1, 2))}, metadata=hostile)
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_alpha_means_rank_and_int_alpha_is_read(tmp_path):
    up, down = torch.randn(5, 3), torch.randn(3, 7)
    path = tmp_path / "n.safetensors"
    save_file(
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": up,
            "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": down,
            "lora_unet_b.lora_up.weight": up.clone(),
            "lora_unet_b.lora_down.weight": down.clone(),
            "lora_unet_b.alpha": torch.tensor(6),  # kohya writes an int64 alpha when no save dtype is given
        },
        str(path),
    )
    modules = read_lora(path).modules
    plain = modules["lora_te_text_model_encoder_layers_0_mlp_fc2"]
    assert plain.alpha == 3.0 and plain.scale == 1.0
    assert rel_err(plain.delta(), product(up, down)) < 1e-6
    assert modules["lora_unet_b"].scale == 2.0
    assert rel_err(modules["lora_unet_b"].delta(), 2 * product(up, down)) < 1e-6


def _kohya(name: str = "lora_unet_a") -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.ones(2, 4), f"{name}.lora_up.weight": torch.ones(3, 2)}


UNSUPPORTED = {
    "loha": (
        {"lora_unet_a.hada_w1_a": torch.ones(2, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 2)},
        "LoHa",
        "hada_w1_a",
    ),
    "lokr": ({"lora_unet_a.lokr_w1": torch.ones(2, 2), "lora_unet_a.lokr_w2": torch.ones(2, 2)}, "LoKr", "lokr_w1"),
    "dora": (_kohya() | {"lora_unet_a.dora_scale": torch.ones(1, 4)}, "DoRA", "lora_unet_a.dora_scale"),
    "peft": ({"unet.down_blocks.0.to_q.lora_A.weight": torch.ones(2, 4)}, "PEFT", "lora_A"),
    "old diffusers": ({"unet.mid_block.to_k.lora.down.weight": torch.ones(2, 4)}, "PEFT", "lora.down"),
    "tucker": (_kohya() | {"lora_unet_a.lora_mid.weight": torch.ones(2, 2, 3, 3)}, "lora_mid", "lora_mid.weight"),
    "diff": (_kohya() | {"lora_unet_b.diff": torch.ones(3, 3)}, "full-difference", "lora_unet_b.diff"),
    "diff_b": (_kohya() | {"lora_unet_b.diff_b": torch.ones(3)}, "full-difference", "lora_unet_b.diff_b"),
    "extra key": (_kohya() | {"lora_unet_a.w_norm": torch.ones(3)}, "not supported", "lora_unet_a.w_norm"),
    "other model": ({"lora_transformer_x.lora_down.weight": torch.ones(2, 4)}, "not supported", "lora_transformer_x"),
    "checkpoint": ({"model.diffusion_model.out.2.weight": torch.ones(2)}, "a checkpoint", "model.diffusion_model"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_kinds_are_refused_naming_keys(tmp_path, case):
    tensors, what, key = UNSUPPORTED[case]
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match="not supported|not a LoRA") as info:
        read_lora(path)
    message = str(info.value)
    assert what in message and key in message and "\n" not in message
    assert not lora_kind_of(tensors).supported


BROKEN = {
    "down without up": ({"lora_unet_a.lora_down.weight": torch.ones(2, 4)}, "without lora_unet_a.lora_up.weight"),
    "up without down": (
        _kohya() | {"lora_unet_b.lora_up.weight": torch.ones(2, 2), "lora_unet_b.alpha": torch.tensor(1.0)},
        "without lora_unet_b.lora_down.weight",
    ),
    "rank mismatch": (
        {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 5)},
        "rank",
    ),
    "3x3 up": (
        {"lora_unet_a.lora_down.weight": torch.ones(2, 4, 3, 3), "lora_unet_a.lora_up.weight": torch.ones(3, 2, 3, 3)},
        "not a LoRA pair",
    ),
    "nan": (_kohya() | {"lora_unet_a.lora_up.weight": torch.tensor([[1.0, float("nan")]] * 3)}, "NaN/Inf"),
    "inf": (_kohya() | {"lora_unet_a.lora_down.weight": torch.full((2, 4), float("inf"))}, "NaN/Inf"),
    "empty": ({}, "no tensors"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_are_refused(tmp_path, case):
    tensors, expected = BROKEN[case]
    path = tmp_path / "b.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=expected):
        read_lora(path)


def test_truncated_corrupt_pickle_and_missing_inputs(tmp_path):
    good = write_lora(tmp_path / "g.safetensors", make_factors(), metadata={})
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04 not safetensors at all")
    for path in (truncated, garbage):
        with pytest.raises(InputError, match="truncated or corrupt"):
            read_lora(path)
    for suffix in (".ckpt", ".pt"):
        pickle = tmp_path / f"lora{suffix}"
        torch.save(_kohya(), pickle)
        with pytest.raises(InputError, match="pickle"):
            read_lora(pickle)
    with pytest.raises(InputError, match="no such file"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="folder"):
        read_lora(tmp_path)


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    path = write_lora(tmp_path / "o.safetensors", make_factors(0), metadata={})
    before = path.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        write_lora(path, make_factors(1), metadata={})
    assert path.read_bytes() == before
    write_lora(path, make_factors(1), metadata={}, force=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]  # no temp files left


def test_fp16_overflow_is_refused_without_a_file(tmp_path):
    huge = {"lora_unet_a": (torch.full((2, 1), 1e5), torch.full((1, 2), 1e5))}
    with pytest.raises(OutputError, match="overflows"):
        write_lora(tmp_path / "h.safetensors", huge, metadata={}, dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    write_lora(tmp_path / "h.safetensors", huge, metadata={}, dtype=torch.bfloat16)


def test_write_rejects_bad_factors(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        write_lora(tmp_path / "x.safetensors", {"lora_unet_a": (torch.ones(3, 2), torch.ones(3, 4))}, metadata={})
    with pytest.raises(ValueError, match="NaN"):
        write_lora(
            tmp_path / "x.safetensors",
            {"lora_unet_a": (torch.ones(3, 2), torch.full((2, 4), float("nan")))},
            metadata={},
        )
    with pytest.raises(InputError, match="prefix"):
        write_lora(tmp_path / "x.safetensors", {"unet_a": (torch.ones(3, 2), torch.ones(2, 4))}, metadata={})
    assert not (tmp_path / "x.safetensors").exists()


def test_module_component_and_module_math():
    assert module_component("lora_unet_middle_block_1_proj_in") == "unet"
    assert module_component("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "te1"
    assert module_component("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha") == "te2"
    assert module_component("lora_te_text_model_encoder_layers_0_mlp_fc1") == "te1"
    with pytest.raises(InputError):
        module_component("lora_transformer_x")
    module = LoraModule(up=torch.ones(3, 2), down=torch.ones(2, 4), alpha=1.0)
    assert (module.rank, module.scale, module.params, module.kind) == (2, 0.5, 14, "linear")
    assert torch.equal(module.delta(), torch.ones(3, 4))


def test_written_lora_loads_into_diffusers_with_exact_deltas(tiny_paths, tmp_path):
    """Varying ranks, one alpha: diffusers applies every module's delta exactly (per-layer alphas would not)."""
    from diffusers import StableDiffusionXLPipeline

    from xlbake.lora.names import kohya_targets
    from xlbake.sdxl.keys import sgm_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_paths.diffusers_dir)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    base = {key: value.clone() for key, value in sgm_state_dict(**models).items()}
    targets = kohya_targets({key: tuple(value.shape) for key, value in base.items()}, conv=True)
    assert {t.component for t in targets} == {"unet", "te1", "te2"}
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for index, target in enumerate(targets):
        rank = 1 + index % 4
        up = 0.05 * torch.randn(target.shape[0], rank, generator=gen)
        factors[target.name] = (up, 0.05 * torch.randn(rank, *target.shape[1:], generator=gen))
    out = write_lora(tmp_path / "tiny.safetensors", factors, metadata=meta(), dtype=torch.float32)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    after = sgm_state_dict(**models)
    for target in targets:
        change = after[target.key] - base[target.key]
        change = change if target.rows is None else change[target.rows[0] : target.rows[1]]
        assert rel_err(change, product(*factors[target.name])) < 1e-4, target.name
    touched = {target.key for target in targets}
    assert all(torch.equal(after[key], base[key]) for key in base if key not in touched)


def test_network_dim_counts_linear_modules_only():
    """A conv module's rank neither hides a differing linear rank nor stands in for the linear one."""
    ranks = {"lora_unet_a": 8, "lora_unet_b": 4, "lora_unet_conv": 4}
    meta = lora_metadata(title="t", ranks=ranks, alpha=8.0, conv_rank=4, conv_names=["lora_unet_conv"])
    assert meta["ss_network_dim"] == "Dynamic"
    ranks = {"lora_unet_a": 8, "lora_unet_conv": 4}
    meta = lora_metadata(title="t", ranks=ranks, alpha=8.0, conv_rank=8, conv_names=["lora_unet_conv"])
    assert meta["ss_network_dim"] == "8"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_among_finite_ones_is_refused(tmp_path, dtype, bad):
    down = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    down[1, 2, 0, 1] = bad
    path = tmp_path / "b.safetensors"
    up = torch.ones(3, 2, 1, 1, dtype=dtype)
    save_file({"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up}, str(path))
    with pytest.raises(InputError, match="NaN/Inf"):
        read_lora(path)


def test_read_tensors_own_their_memory_and_not_a_view_of_the_file(tmp_path):
    # a view of a memory map would keep the whole file resident to the end, and would change with the file
    path = write_lora(tmp_path / "g.safetensors", make_factors(), metadata={})
    modules = read_lora(path).modules
    before = {name: module.down.clone() for name, module in modules.items()}
    with open(path, "r+b") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        size = path.stat().st_size - 8 - header_len
        handle.seek(8 + header_len)
        handle.write(bytes(size))
    for name, module in modules.items():
        assert torch.equal(module.down, before[name])


def test_factors_of_rank_alpha_already_in_the_save_dtype_are_written_as_held(tmp_path, monkeypatch):
    import xlbake.lora.io as io

    gen = torch.Generator().manual_seed(4)
    held = {"lora_unet_a": (torch.randn(6, 2, generator=gen).half(), torch.randn(2, 5, generator=gen).half())}
    folded = write_lora(tmp_path / "folded.safetensors", {k: (u.float(), d.float()) for k, (u, d) in held.items()},
                        metadata={}, alpha=2.0)  # fmt: skip
    monkeypatch.setattr(io, "fold_alpha", lambda *a: pytest.fail("a rank-alpha fp16 module was folded again"))
    as_held = write_lora(tmp_path / "held.safetensors", held, metadata={}, alpha=2.0)
    assert as_held.read_bytes() == folded.read_bytes()  # the same file, without the fp32 round trip
    held["lora_unet_a"][1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        write_lora(tmp_path / "bad.safetensors", held, metadata={}, alpha=2.0)
