"""The resize stage: exact factor-space truncation, rank selection, budgets, metadata, inputs from any tool, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resize.config import ResizeConfig
from resize.metadata import RECORD_KEY
from resize.pipeline import run_resize
from xlbake.config import load_config
from xlbake.errors import ConfigError, InputError, OutputError
from xlbake.lora.io import HASH_KEY, read_lora
from xlbake.lora.names import kohya_targets
from xlbake.lora.report import report_paths
from xlbake.sdxl.keys import sgm_state_dict
from xlbake.sdxl.tensorfile import safetensors_data_hash

LINEAR = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
CONV3 = "lora_unet_input_blocks_1_0_in_layers_2"
CONV1 = "lora_unet_input_blocks_4_0_skip_connection"
TE1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
# name -> (out, in, kernel): kernel 0 is a Linear
SHAPES = {LINEAR: (24, 16, 0), CONV3: (12, 10, 3), CONV1: (20, 12, 1), TE1: (32, 16, 0), TE2: (16, 16, 0)}


def factor_shapes(out: int, inp: int, kernel: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if kernel == 0:
        return (out, rank), (rank, inp)
    return (out, rank, 1, 1), (rank, inp, kernel, kernel)


def save_kohya(path, modules, *, dtype=torch.float32, metadata=None):
    """Write name -> (up, down, alpha or None) the way any kohya-format tool does (alpha may be missing)."""
    tensors = {}
    for name, (up, down, alpha) in modules.items():
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(tensors, str(path), metadata=metadata)
    return path


def random_lora(path, *, rank=8, alpha=3.0, ranks=None, dtype=torch.float32, metadata=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (out, inp, kernel) in SHAPES.items():
        r = (ranks or {}).get(name, rank)
        up_shape, down_shape = factor_shapes(out, inp, kernel, r)
        modules[name] = (torch.randn(up_shape, generator=gen), torch.randn(down_shape, generator=gen), alpha)
    return save_kohya(path, modules, dtype=dtype, metadata=metadata)


def delta64(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha / r) * up @ down in fp64 as an (out, in * k * k) matrix."""
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    return scale * (up.double().flatten(1) @ down.double().flatten(1))


def truncated64(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def resize(tmp_path, lora, *, force=False, **settings):
    settings.setdefault("out", tmp_path / "out.safetensors")
    cfg = load_config(ResizeConfig, data={"lora": str(lora), **{k: _plain(v) for k, v in settings.items()}})
    return run_resize(cfg, force=force)


def _plain(value):
    return str(value) if hasattr(value, "__fspath__") else value


def out_matrix(module) -> torch.Tensor:
    return module.delta().double().flatten(1)


def test_resize_equals_truncated_svd_of_the_full_product(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors", rank=8, alpha=3.0)
    source = load_file(str(lora))
    [result] = resize(tmp_path, lora, rank=[3], conv_rank=2, save_precision="fp32", report=False)
    written = read_lora(result.path).modules
    assert {m.kind for m in written.values()} == {"linear", "conv1x1", "conv3x3"}
    for name in SHAPES:
        up, down = source[f"{name}.lora_up.weight"], source[f"{name}.lora_down.weight"]
        expected_rank = 2 if name == CONV3 else 3
        expected = truncated64(delta64(up, down, 3.0), expected_rank)
        module = written[name]
        assert module.rank == expected_rank and module.down.shape[1:] == down.shape[1:], name
        assert module.up.shape[2:] == up.shape[2:], name
        assert rel_err(out_matrix(module), expected) < 1e-5, name
    assert len({m.alpha for m in written.values()}) == 1  # one alpha everywhere, scales folded


def spectrum_layer(singular_values, *, out=12, inp=10, alpha=2.0, seed=0):
    """up, down, alpha whose delta has exactly these singular values."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(singular_values, dtype=torch.float64)
    rank = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64))
    return u * s * (rank / alpha), v.T.contiguous(), alpha


GOLDEN = [  # singular values, method, value, rank cap, expected rank
    ([10, 1, 1, 1], "sv_ratio", 5, None, 1),  # kohya's resize keeps 2 here
    ([10, 5, 1, 0.5, 0.1], "sv_ratio", 4, None, 2),
    ([10, 5, 1, 0.5, 0.1], "sv_fro", 0.9, None, 2),
    ([10, 5, 1, 0.5, 0.1], "sv_cumulative", 0.6, None, 1),
    ([10, 5, 1, 0.5, 0.1], "sv_cumulative", 0.99, None, 4),
    ([10, 5, 1, 0.5, 0.1], "sv_fro", 0.99999, 3, 3),  # the criterion wants 5, --rank caps it
]


@pytest.mark.parametrize(("values", "method", "value", "cap", "expected"), GOLDEN)
def test_dynamic_methods_keep_the_minimal_rank(tmp_path, values, method, value, cap, expected):
    lora = save_kohya(tmp_path / "in.safetensors", {LINEAR: spectrum_layer(values)})
    settings = {"method": method, "value": value, "save_precision": "fp32", "report": False}
    [result] = resize(tmp_path, lora, rank=[cap] if cap else [], **settings)
    module = read_lora(result.path).modules[LINEAR]
    assert module.rank == expected
    kept = torch.linalg.svdvals(out_matrix(module))[:expected]
    assert torch.allclose(kept, torch.tensor(values[:expected], dtype=torch.float64), rtol=1e-5)
    assert read_lora(result.path).metadata["ss_network_dim"] == str(expected)  # one module: not "Dynamic"


def test_lower_rank_layers_are_kept_as_is_and_said_once(tmp_path, caplog):
    ranks = {LINEAR: 4, CONV1: 2, TE1: 4}  # the others have rank 8
    lora = random_lora(tmp_path / "in.safetensors", rank=8, ranks=ranks, alpha=None)
    source = load_file(str(lora))
    with caplog.at_level(logging.INFO, logger="resize"):
        [result] = resize(tmp_path, lora, rank=[6], save_precision="fp32", report=False)
    notices = [r.getMessage() for r in caplog.records if "kept as is" in r.getMessage()]
    assert len(notices) == 1 and "3 of 5 layers" in notices[0]
    written = read_lora(result.path)
    for name in SHAPES:
        up, down = source[f"{name}.lora_up.weight"], source[f"{name}.lora_down.weight"]
        module = written.modules[name]
        assert module.rank == ranks.get(name, 6), name  # never padded up to 6
        expected = truncated64(delta64(up, down, None), module.rank)
        assert rel_err(out_matrix(module), expected) < 1e-5, name
    assert written.metadata["ss_network_dim"] == "Dynamic"
    assert result.kept_as_is == 3


def test_several_ranks_one_file_each_named_by_rank(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors")
    results = resize(tmp_path, lora, rank=[2, 4], out=tmp_path / "small.safetensors")
    assert [r.path.name for r in results] == ["small-r2.safetensors", "small-r4.safetensors"]
    for result, rank in zip(results, (2, 4), strict=True):
        lora_file = read_lora(result.path)
        assert {m.rank for m in lora_file.modules.values()} == {rank}
        assert lora_file.metadata["ss_network_dim"] == str(rank)
        assert all(path.is_file() for path in report_paths(result.path)) and result.reports
        report = json.loads(report_paths(result.path)[0].read_text())
        assert len(report["layers"]) == len(SHAPES) and 0 < report["total"]["kept_energy"] < 1
    [named] = resize(tmp_path, lora, rank=[3], out=tmp_path / "lora-{rank}.safetensors", report=False)
    assert named.path.name == "lora-3.safetensors"
    kept = [r.layers[0].kept for r in (results[0], named, results[1])]
    assert kept == sorted(kept) and kept[0] < kept[-1]  # more rank, more kept energy


def test_metadata_is_kept_updated_and_records_the_resize(tmp_path):
    source_meta = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_dim": "8",
        "ss_network_alpha": "3.0",
        "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "3", "algo": "lora"}),
        "ss_tag_frequency": json.dumps({"1_xlbk": {"xlbk": 3}}),
        "ss_dataset_dirs": json.dumps({"1_xlbk": {"n_repeats": 1, "img_count": 3}}),
        "modelspec.trigger_phrase": "xlbk",
        "ss_training_comment": "from the trainer",
        "modelspec.title": "old title",
        "ss_broken": "{not json",
    }
    lora = random_lora(tmp_path / "in.safetensors", metadata=source_meta)
    [result] = resize(tmp_path, lora, rank=[4], conv_rank=2, out=tmp_path / "lora-r4.safetensors", report=False)
    meta = read_lora(result.path).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "4.0", "algo": "lora"}
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "modelspec.trigger_phrase"):  # the training data, as kohya's
        assert meta[key] == source_meta[key], key
    assert meta["ss_training_comment"] == "from the trainer" and "ss_broken" not in meta
    assert meta["modelspec.title"] == meta["ss_output_name"] == "lora-r4"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"  # SDXL keys filled in
    assert meta[HASH_KEY] == safetensors_data_hash(result.path)
    record = json.loads(meta[RECORD_KEY])
    assert record["source"] == "in.safetensors" and record["source_sshs_model_hash"] == safetensors_data_hash(lora)
    assert (record["rank"], record["conv_rank"], record["ranks"]) == (4, 2, {"min": 2, "max": 4})
    with safe_open(str(result.path), framework="pt") as handle:
        assert {float(handle.get_tensor(k)) for k in list(handle.keys()) if k.endswith(".alpha")} == {4.0}


def test_dynamic_output_says_dynamic(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors", rank=8, ranks={LINEAR: 2})
    [result] = resize(tmp_path, lora, method="sv_cumulative", value=0.5, report=False)
    meta = read_lora(result.path).metadata
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert json.loads(meta[RECORD_KEY])["method"] == "sv_cumulative"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_inputs_in_any_precision_without_alpha(tmp_path, dtype):
    lora = random_lora(tmp_path / "in.safetensors", rank=4, alpha=None, dtype=dtype)
    source = load_file(str(lora))
    [result] = resize(tmp_path, lora, rank=[4], save_precision="fp32", report=False)  # same rank: lossless
    written = read_lora(result.path).modules
    for name in SHAPES:
        expected = delta64(source[f"{name}.lora_up.weight"], source[f"{name}.lora_down.weight"], None)
        assert rel_err(out_matrix(written[name]), expected) < 1e-5, name


def test_size_budget_fits_and_beats_one_rank_everywhere(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors", rank=8, ranks={TE2: 2, CONV1: 3})
    [uniform] = resize(tmp_path, lora, rank=[3], out=tmp_path / "uniform.safetensors", report=False)
    params = sum(s.params for s in uniform.layers)
    [counted] = resize(tmp_path, lora, size=[f"{params} params"], out=tmp_path / "p.safetensors", report=False)
    assert sum(s.params for s in counted.layers) <= params
    kept = [sum(s.energy * s.kept for s in result.layers) for result in (counted, uniform)]
    assert kept[0] >= kept[1] - 1e-9
    assert len({s.rank for s in counted.layers}) > 1  # the allocation really differs per layer here

    budget = uniform.file_bytes
    [sized] = resize(tmp_path, lora, size=[f"{budget}B"], out=tmp_path / "sized.safetensors", report=False)
    assert budget - 1024 < sized.file_bytes <= budget  # the header is estimated from above, tightly
    assert json.loads(read_lora(sized.path).metadata[RECORD_KEY])["size"] == f"{budget}B"


def test_size_budget_below_rank_one_everywhere_is_refused(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors")
    with pytest.raises(InputError, match="too small"):
        resize(tmp_path, lora, size=["10 params"])
    assert not (tmp_path / "out.safetensors").exists()


def test_zero_layer_is_written_as_zero(tmp_path):
    up, down, alpha = spectrum_layer([3.0, 2.0])
    zero = (torch.zeros(32, 2), torch.randn(2, 16), 2.0)
    lora = save_kohya(tmp_path / "in.safetensors", {LINEAR: (up, down, alpha), TE1: zero})
    [result] = resize(tmp_path, lora, rank=[1], report=False)
    module = read_lora(result.path).modules[TE1]
    assert module.rank == 1 and float(module.delta().abs().max()) == 0.0
    assert [s.kept for s in result.layers if s.name == TE1] == [1.0]


UNSUPPORTED = {
    "LoHa": ({"lora_unet_a.hada_w1_a": torch.ones(2, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 2)}, "hada_w1_a"),
    "DoRA": (
        {
            "lora_unet_a.lora_down.weight": torch.ones(2, 4),
            "lora_unet_a.lora_up.weight": torch.ones(3, 2),
            "lora_unet_a.dora_scale": torch.ones(1, 4),
        },
        "dora_scale",
    ),
    "LoKr": ({"lora_unet_a.lokr_w1": torch.ones(2, 2), "lora_unet_a.lokr_w2": torch.ones(2, 2)}, "lokr_w1"),
    "PEFT": ({"unet.down_blocks.0.to_q.lora_A.weight": torch.ones(2, 4)}, "lora_A"),
    "not a LoRA": ({"model.diffusion_model.out.2.weight": torch.ones(2, 2)}, "not a LoRA"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_input_is_refused_and_nothing_written(tmp_path, case):
    tensors, shown = UNSUPPORTED[case]
    save_file(tensors, str(tmp_path / "in.safetensors"))
    with pytest.raises(InputError, match=shown) as info:
        resize(tmp_path, tmp_path / "in.safetensors", rank=[1])
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_existing_output_needs_force(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--force"):
        resize(tmp_path, lora, rank=[2])
    assert out.read_bytes() == b"keep me"
    assert not report_paths(out)[0].exists()
    [result] = resize(tmp_path, lora, rank=[2], force=True, report=False)
    assert read_lora(result.path).modules[LINEAR].rank == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": [0]}, "positive"),
        ({"rank": [-4]}, "positive"),
        ({"rank": [8], "conv_rank": 0}, "positive"),
        ({}, "rank: missing"),
        ({"method": "sv_fro"}, "needs --value"),
        ({"method": "sv_ratio", "value": 0.5}, ">= 1"),
        ({"method": "sv_fro", "value": 1.5}, r"\(0, 1\]"),
        ({"size": ["50 parsecs"]}, "expected a file size"),
        ({"size": ["50MB"], "method": "sv_fro", "value": 0.9}, "exclude each other"),
    ],
)
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ResizeConfig, data=settings)


def test_output_names_are_checked_before_any_work(tmp_path):
    lora = random_lora(tmp_path / "in.safetensors")
    with pytest.raises(ConfigError, match="is the input"):
        resize(tmp_path, lora, rank=[2], out=lora)
    with pytest.raises(ConfigError, match="needs --size"):
        resize(tmp_path, lora, rank=[2], out=tmp_path / "x-{size}.safetensors")
    with pytest.raises(ConfigError, match=".safetensors"):
        resize(tmp_path, lora, rank=[2], out=tmp_path / "x.ckpt")


def test_resized_tiny_lora_loads_in_diffusers_with_every_module_applied(tmp_path, tiny_paths):
    """A resized kohya LoRA over every kohya module of the tiny SDXL: diffusers matches every key and fusing it
    changes exactly the targeted weights by the written deltas."""
    with safe_open(str(tiny_paths.single_file), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in list(handle.keys())}
    targets = kohya_targets(shapes, conv=True)
    gen = torch.Generator().manual_seed(0)
    modules = {}
    for target in targets:
        out, inp, kernel = target.shape[0], target.shape[1], target.shape[2] if len(target.shape) == 4 else 0
        up_shape, down_shape = factor_shapes(out, inp, kernel, 4)
        modules[target.name] = (0.1 * torch.randn(up_shape, generator=gen), torch.randn(down_shape, generator=gen), 2.0)
    lora = save_kohya(tmp_path / "in.safetensors", modules, dtype=torch.float16)
    [result] = resize(tmp_path, lora, rank=[2], conv_rank=3, report=False)
    written = read_lora(result.path).modules
    assert set(written) == {t.name for t in targets}

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_paths.diffusers_dir))
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    before = {k: v.detach().clone() for k, v in sgm_state_dict(**parts).items()}
    pipe.load_lora_weights(str(result.path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    after = sgm_state_dict(**parts)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {t.key for t in targets}  # nothing unmatched, nothing extra
    for target in targets:
        rows = slice(*target.rows) if target.rows else slice(None)
        applied = (after[target.key] - before[target.key])[rows]
        assert rel_err(applied, written[target.name].delta()) < 1e-3, target.name


def test_a_fixed_rank_with_zero_padding_modules_is_not_dynamic(tmp_path):
    """Extract writes an unchanged layer of an extracted text encoder as a zero rank-1 module; resizing the rest to
    rank 4 is a rank-4 LoRA, not a Dynamic one."""
    modules = {name: (up, down, 8.0) for name, up, down in _modules(rank=8, skip=TE1)}
    modules[TE1] = (torch.zeros(32, 1), torch.zeros(1, 16), 1.0)
    lora = save_kohya(tmp_path / "in.safetensors", modules)
    [result] = resize(tmp_path, lora, rank=[4], conv_rank=4, report=False)
    written = read_lora(result.path)
    assert written.modules[TE1].rank == 1
    assert written.metadata["ss_network_dim"] == "4" and written.metadata["ss_network_alpha"] == "4.0"


def _modules(*, rank, skip):
    gen = torch.Generator().manual_seed(5)
    for name, (out, inp, kernel) in SHAPES.items():
        if name != skip:
            up_shape, down_shape = factor_shapes(out, inp, kernel, rank)
            yield name, torch.randn(up_shape, generator=gen), torch.randn(down_shape, generator=gen)


def test_the_extract_coverage_is_carried_forward(tmp_path):
    """What the input covered of the finetune stays; what it kept of that is multiplied by what the resize keeps."""
    coverage = {"covered": 0.5, "left_out": {"3x3 convs": 0.3, "norms": 0.2}, "kept_of_covered": 0.9}
    lora = random_lora(tmp_path / "in.safetensors", rank=8, metadata={"xlbake_coverage": json.dumps(coverage)})
    [result] = resize(tmp_path, lora, rank=[3])
    kept = result.layers and sum(s.energy * s.kept for s in result.layers) / sum(s.energy for s in result.layers)
    report = json.loads(report_paths(result.path)[0].read_text())
    assert report["finetune"]["covered"] == 0.5 and report["finetune"]["left_out"] == coverage["left_out"]
    assert report["finetune"]["kept_of_covered"] == pytest.approx(0.9 * kept)
    assert report["finetune"]["kept_of_finetune"] == pytest.approx(0.45 * kept)
    carried = json.loads(read_lora(result.path).metadata["xlbake_coverage"])
    assert carried["kept_of_covered"] == pytest.approx(0.9 * kept, abs=1e-6)  # a resize of the resize goes on
    [plain] = resize(tmp_path, random_lora(tmp_path / "plain.safetensors"), rank=[3], out=tmp_path / "p.safetensors")
    assert "finetune" not in json.loads(report_paths(plain.path)[0].read_text())


@pytest.mark.parametrize("convs", [True, False])
def test_calibrated_resize_is_the_whitened_optimum_and_plain_where_there_are_no_statistics(tmp_path, convs):
    from xlbake.lora.calibration import Calibration, write_calibration
    from xlbake.lora.lowrank import split_factors, svd_exact
    from xlbake.lora.moments import compress, moment_whitening
    from xlbake.lora.whiten import DAMPING, unwhiten, whiten

    lora = random_lora(tmp_path / "in.safetensors", rank=8, alpha=3.0)
    source = load_file(str(lora))
    gen = torch.Generator().manual_seed(5)
    moments = {}
    for name in (LINEAR, CONV1, TE1, CONV3):  # TE2 has none: resized plainly
        inp = SHAPES[name][1]
        basis = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64)).Q
        c = ((basis * torch.logspace(1, -3, inp, dtype=torch.float64)) @ basis.T).float()
        taps = torch.eye(9) + 0.3 * torch.ones(9, 9) if name == CONV3 else None  # 3x3: Kronecker statistics
        moments[name] = compress(c, rank=inp, taps=taps)
    path = tmp_path / "calibration.safetensors"
    calibration = write_calibration(Calibration(moments, {n: n for n in moments}, {}), path)
    [result] = resize(
        tmp_path, lora, rank=[3], conv_rank=2, save_precision="fp32", report=False, calibration=calibration,
        calibrate_convs=convs,
    )
    written = read_lora(result.path).modules
    for name in SHAPES:
        up, down = source[f"{name}.lora_up.weight"], source[f"{name}.lora_down.weight"]
        delta, rank = delta64(up, down, 3.0), 2 if name == CONV3 else 3
        if name in moments and (convs or name != CONV3):  # the whitened optimum: exact SVD of ΔW S, down mapped back
            factor = moment_whitening(moments[name], DAMPING)
            ref_up, ref_down = split_factors(svd_exact(whiten(delta, factor), rank), rank)
            expected = ref_up @ unwhiten(ref_down, factor)
        else:
            expected = truncated64(delta, rank)
        assert rel_err(out_matrix(written[name]), expected) < 1e-4, name
    assert json.loads(read_lora(result.path).metadata["xlbake_resize_calibration"])["file"] == "calibration.safetensors"


def test_layers_are_factored_on_workers_of_one_thread_each(tmp_path, monkeypatch):
    # a layer's small eigh and GEMMs split over threads cost many times their CPU time: whole layers go to workers
    import threading

    import resize.pipeline as pipeline

    seen, real = [], pipeline.layer_svd
    def layer_svd(*args, **kwargs):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "layer_svd", layer_svd)
    modules = {f"lora_unet_l{i}": torch.randn(6, 4) for i in range(8)}
    save_kohya(tmp_path / "in.safetensors", {name: (up, torch.randn(4, 5), 4.0) for name, up in modules.items()})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        modules_read = read_lora(tmp_path / "in.safetensors").modules
        layers = pipeline.factorize(modules_read, lambda kind: 2, torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [layer.name for layer in layers] == sorted(modules)
    assert {threads for _, threads in seen} == {1} and threading.get_ident() not in {ident for ident, _ in seen}


def test_outputs_are_written_on_one_thread_and_the_thread_count_is_restored(tmp_path, monkeypatch):
    import resize.pipeline as pipeline

    seen, real = [], pipeline.write_lora

    def write_lora(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_lora", write_lora)
    lora = random_lora(tmp_path / "in.safetensors")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        resize(tmp_path, lora, rank=[3], report=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
