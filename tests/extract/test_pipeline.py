"""extract: planted low-rank differences are recovered, several ranks = separate runs, size budgets, text-encoder
decisions, and the file loads into diffusers' SDXL pipeline reproducing the tuned model."""

import json
import logging
import math
import re

import pytest
import torch

from extract.components import ComponentDiff, decide, rounding_floor
from extract.config import ExtractConfig
from extract.pipeline import run_extract
from xlbake.errors import InputError
from xlbake.lora.io import read_lora
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint

RANK = 2
UNET_REL, TE_REL = 1e-3, 1e-4  # a 1e-6-LR finetune's difference relative to the weights
RECOVERY_REL = 1e-3
"""Largest relative (Frobenius) error of a recovered planted difference: reading tuned - base back from fp32 files
carries rounding of up to 2**-24 of the weight, i.e. 2**-24 / TE_REL = 6e-4 of a text-encoder difference at most
(measured: <= 7e-5 exact and fast, UNet <= 1e-5); a missing or zeroed module is off by 1. An absolute bound cannot
tell: the text-encoder differences are themselves below 1e-4."""
PLANTED = {  # name fragment -> component; the first kohya target whose name contains it gets a rank-2 difference
    "attn1_to_q": "unet",
    "ff_net_0_proj": "unet",
    "in_layers_2": "unet",  # 3x3 conv (needs a conv dim)
    "skip_connection": "unet",  # 1x1 conv
    "te2_text_model_encoder_layers_1_self_attn_k_proj": "te2",  # rows 64:128 of the fused in_proj
    "te2_text_model_encoder_layers_0_mlp_fc1": "te2",
}


DATASET_META = {  # what the finetune records of its dataset (xlbake.data.meta)
    "ss_tag_frequency": json.dumps({"2_xlbk emblem": {"xlbk emblem": 2, "red": 1}}),
    "ss_dataset_dirs": json.dumps({"2_xlbk emblem": {"n_repeats": 2, "img_count": 2}}),
    "modelspec.trigger_phrase": "xlbk",
}


def _weights(path):
    with open_checkpoint(path) as reader:
        return {key: reader.get(key).clone() for key in reader}


def _targets(weights, conv=True):
    return kohya_targets({k: tuple(v.shape) for k, v in weights.items()}, conv=conv)


def _low_rank(shape, rank, gen):
    n = math.prod(shape[1:])
    return (torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, n, generator=gen)).reshape(shape)


def _decaying(shape, gen):
    """A full-rank difference with a decaying spectrum (sigma_i ~ 1 / (i + 1)), like a finetune's."""
    m, n = shape[0], math.prod(shape[1:])
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return (u * (1.0 / torch.arange(1, k + 1)) @ v.T).reshape(shape)


def _add(weights, target, delta, rel):
    """Add ``delta`` scaled to ``rel`` of the target weight's norm; return the scaled delta."""
    weight = weights[target.key]
    rows = slice(*target.rows) if target.rows else slice(None)
    delta = delta * (rel * weight[rows].norm() / delta.norm())
    weights[target.key] = weight.clone()
    weights[target.key][rows] += delta
    return delta


@pytest.fixture(scope="module")
def planted(tiny_paths, tmp_path_factory):
    """Tuned = base + exact rank-2 differences in a few UNet and TE2 layers; TE1 unchanged. fp32 files."""
    weights = _weights(tiny_paths.single_file)
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for fragment, component in PLANTED.items():
        target = next(t for t in _targets(weights) if fragment in t.name)
        rel = UNET_REL if component == "unet" else TE_REL
        deltas[target.name] = _add(weights, target, _low_rank(target.shape, RANK, gen), rel)
    folder = tmp_path_factory.mktemp("planted")
    tuned = save_sgm_checkpoint(weights, folder / "tuned.safetensors", metadata={**DATASET_META, "ss_other": "x"})
    return tuned, deltas, weights


@pytest.fixture(scope="module")
def dense(tiny_paths, tmp_path_factory):
    """Tuned = base + full-rank decaying differences in every LoRA layer (UNet 1e-3, text encoders 1e-4)."""
    weights = _weights(tiny_paths.single_file)
    gen = torch.Generator().manual_seed(1)
    for target in _targets(weights, conv=False):
        _add(weights, target, _decaying(target.shape, gen), UNET_REL if target.component == "unet" else TE_REL)
    return save_sgm_checkpoint(weights, tmp_path_factory.mktemp("dense") / "tuned.safetensors")


def _extract(base, tuned, out, lines=None, **options):
    cfg = ExtractConfig(base=base, tuned=tuned, out=out, save_precision="fp32", **options)
    return run_extract(cfg, echo=(lines.append if lines is not None else lambda _: None))


@pytest.fixture(scope="module")
def planted_run(tiny_paths, planted, tmp_path_factory):
    """One exact pass at ranks 2 and 4 (3x3 convs at rank 2), with the printed lines."""
    lines = []
    out = tmp_path_factory.mktemp("out") / "lora.safetensors"
    result = _extract(tiny_paths.single_file, planted[0], out, lines, dim=(RANK, 4), conv_dim=(RANK,), svd="exact")
    return result, lines


@pytest.mark.parametrize("svd", ["exact", "fast"])
def test_planted_rank_r_difference_is_recovered_and_untouched_layers_are_left_out(
    tiny_paths, planted, planted_run, tmp_path, svd
):
    tuned, deltas, _ = planted
    if svd == "exact":
        path = planted_run[0].outputs[0]
    else:
        options = {"dim": (RANK,), "conv_dim": (RANK,), "svd": "fast"}
        path = _extract(tiny_paths.single_file, tuned, tmp_path / "f.safetensors", **options).outputs[0]
    lora = read_lora(path)
    for name, delta in deltas.items():
        module = lora.modules[name]
        assert module.rank == RANK
        error = ((module.delta() - delta).norm() / delta.norm()).item()
        assert error <= RECOVERY_REL, (name, error)
    unet = {name for name in lora.modules if name.startswith("lora_unet_")}
    assert unet == {name for name in deltas if name.startswith("lora_unet_")}, "unchanged UNet layers are skipped"


def test_several_ranks_from_one_pass_equal_separate_runs(tiny_paths, planted, planted_run, tmp_path):
    multi = planted_run[0].outputs
    assert [p.name for p in multi] == ["lora-dim2.safetensors", "lora-dim4.safetensors"]
    options = {"dim": (4,), "conv_dim": (RANK,), "svd": "exact"}
    single = _extract(tiny_paths.single_file, planted[0], tmp_path / "s.safetensors", **options).outputs[0]
    one, other = read_lora(multi[1]), read_lora(single)
    assert one.modules.keys() == other.modules.keys()
    for name, module in one.modules.items():
        torch.testing.assert_close(module.delta(), other.modules[name].delta(), atol=1e-6, rtol=0)
    assert one.metadata["ss_network_dim"] == "4" and json.loads(one.metadata["ss_network_args"])["conv_dim"] == "2"


def test_text_encoders_extracted_when_changed_a_little_and_skipped_with_a_reason_when_unchanged(planted_run):
    result, lines = planted_run
    decisions = {d.component: d for d in result.decisions}
    assert decisions["te2"].extract and not decisions["te1"].extract and decisions["unet"].extract
    text = "\n".join(lines)
    assert "te1: skipped: unchanged" in text
    assert re.search(r"te2: extracted: difference \d\.\de-05 of its weights", text), text
    assert "kohya's rule (> 0.01) would have silently dropped it" in text
    lora = read_lora(result.outputs[0])
    te2 = {name for name in lora.modules if name.startswith("lora_te2_")}
    assert len(te2) == 6 * 3, "every module of every layer of an extracted encoder"
    assert not any(name.startswith("lora_te1_") for name in lora.modules)
    zero = lora.modules["lora_te2_text_model_encoder_layers_1_self_attn_q_proj"]
    assert torch.count_nonzero(zero.delta()) == 0, "the unchanged q rows of the fused in_proj give a zero module"
    assert json.loads(lora.metadata["xlbake_components"])["te1"].startswith("skipped")
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(lora.metadata["xlbake_sources"])["base"]["fingerprint"].startswith("xlbake-fp1:")
    options = json.loads(lora.metadata["xlbake_extract"])
    assert options["base"] == "tiny-sdxl.safetensors" and options["dim"] == [RANK, 4], "file names, not folders"
    assert json.loads(lora.metadata["xlbake_kept_energy"])["unet"] == pytest.approx(1.0, abs=1e-5)


def test_every_lora_carries_the_finetunes_dataset_keys(planted_run):
    result, _ = planted_run
    for path in result.outputs:
        meta = read_lora(path).metadata
        assert {key: meta.get(key) for key in DATASET_META} == DATASET_META, path.name
        assert "ss_other" not in meta


def test_report_json_and_png_beside_every_output(planted_run):
    for path in planted_run[0].outputs:
        report = json.loads(path.with_name(path.stem + ".report.json").read_text())
        assert report["components"]["unet"]["kept_energy"] == pytest.approx(1.0, abs=1e-6)
        assert report["summary"]["options"]["dim"] == [RANK, 4] and report["summary"]["svd"] == "exact"
        assert path.with_name(path.stem + ".report.png").stat().st_size > 1000


def test_size_budget_fits_and_keeps_at_least_the_best_fixed_rank(tiny_paths, dense, tmp_path):
    fixed = _extract(tiny_paths.single_file, dense, tmp_path / "fixed.safetensors", dim=(3, 4)).outputs
    sizes = [p.stat().st_size for p in fixed]  # kept energy grows with the rank: rank 3 is the best that fits
    budget = (sizes[0] + sizes[1]) // 2
    (budgeted,) = _extract(
        tiny_paths.single_file, dense, tmp_path / "budget.safetensors", dim=(8,), size=f"{budget}B"
    ).outputs
    assert budgeted.stat().st_size <= budget
    kept = {p: json.loads(p.with_name(p.stem + ".report.json").read_text())["total"]["kept_energy"] for p in fixed}
    best_fixed = max(kept[p] for p, size in zip(fixed, sizes, strict=True) if size <= budget)
    report = json.loads(budgeted.with_name(budgeted.stem + ".report.json").read_text())
    assert report["total"]["kept_energy"] >= best_fixed
    assert report["total"]["rank_min"] < report["total"]["rank_max"], "ranks vary across layers"
    assert read_lora(budgeted).metadata["ss_network_dim"] == "Dynamic"


def test_diffusers_loads_the_lora_and_reproduces_the_tuned_unet(tiny_paths, planted, planted_run, caplog):
    from diffusers import StableDiffusionXLPipeline

    from xlbake.sdxl.keys import diffusers_state_dicts, sgm_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_paths.diffusers_dir)
    tuned_unet = type(pipe.unet).from_config(pipe.unet.config).eval()
    tuned_sd = diffusers_state_dicts(planted[2])
    tuned_unet.load_state_dict(tuned_sd["unet"])
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(1, 4, 16, 16, generator=gen),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=gen),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.rand(1, 6)},
    }
    with torch.no_grad():
        base_out, tuned_out = pipe.unet(**inputs).sample, tuned_unet(**inputs).sample
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(str(planted_run[0].outputs[0]))
        lora_out = pipe.unet(**inputs).sample
    assert not [
        r for r in caplog.records if "led to unexpected" in r.getMessage() or "led to missing" in r.getMessage()
    ]
    assert (lora_out - tuned_out).norm() < 1e-2 * (base_out - tuned_out).norm()  # fp32 rounding of the outputs
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = sgm_state_dict(unet=pipe.unet, text_encoder_2=pipe.text_encoder_2)
    for key, value in fused.items():
        torch.testing.assert_close(value, planted[2][key], atol=2e-6, rtol=0, msg=key)


EXTRA = (  # the layers kohya leaves out: time and label embeddings, conv_in and conv_out
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.label_emb.0.2.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.out.2.weight",
)


def test_extra_layers_are_extracted_on_request_and_load_into_diffusers(tiny_paths, tmp_path, caplog):
    from diffusers import StableDiffusionXLPipeline

    from xlbake.sdxl.keys import sgm_state_dict

    weights = _weights(tiny_paths.single_file)
    gen = torch.Generator().manual_seed(2)
    for key in EXTRA:
        weights[key] = weights[key] + 1e-2 * _low_rank(weights[key].shape, 1, gen)
    tuned = save_sgm_checkpoint(weights, tmp_path / "tuned.safetensors")
    options = {"dim": (RANK,), "conv_dim": (RANK,), "svd": "exact"}
    with pytest.raises(InputError, match="identical"):  # kohya's module set does not see these changes
        _extract(tiny_paths.single_file, tuned, tmp_path / "kohya-set.safetensors", **options)
    [path] = _extract(
        tiny_paths.single_file, tuned, tmp_path / "extra.safetensors", extra_layers=True, **options
    ).outputs
    names = {"lora_unet_time_embed_0", "lora_unet_label_emb_0_2", "lora_unet_input_blocks_0_0", "lora_unet_out_2"}
    assert set(read_lora(path).modules) == names
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_paths.diffusers_dir)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    assert not [
        r for r in caplog.records if "led to unexpected" in r.getMessage() or "led to missing" in r.getMessage()
    ]
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = sgm_state_dict(unet=pipe.unet)
    for key in EXTRA:
        torch.testing.assert_close(fused[key], weights[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_result(tiny_paths, planted, planted_run, tmp_path):
    options = {"dim": (RANK, 4), "conv_dim": (RANK,), "svd": "exact", "device": "cuda"}
    outputs = _extract(tiny_paths.single_file, planted[0], tmp_path / "lora.safetensors", **options).outputs
    for gpu, cpu in zip(outputs, planted_run[0].outputs, strict=True):
        for name, module in read_lora(cpu).modules.items():
            torch.testing.assert_close(read_lora(gpu).modules[name].delta(), module.delta(), atol=1e-6, rtol=0)


def test_clamp_quantile_clamps_the_factors_and_1_leaves_them_alone():
    from extract.outputs import LayerResult, module_factors
    from xlbake.lora.names import LoraTarget

    gen = torch.Generator().manual_seed(0)
    target = LoraTarget("lora_unet_x", "unet", "model.diffusion_model.x.weight", None, "conv3x3", (8, 4, 3, 3))
    up, down = torch.randn(8, 4, generator=gen), torch.randn(4, 36, generator=gen)
    layer = LayerResult(target, up, down, torch.ones(4), 1.0, False)
    same_up, same_down = module_factors(layer, 3, 1.0)
    assert torch.equal(same_up.flatten(1), up[:, :3]) and torch.equal(same_down.flatten(1), down[:3])
    assert same_up.shape == (8, 3, 1, 1) and same_down.shape == (3, 4, 3, 3)
    clamped_up, clamped_down = module_factors(layer, 3, 0.9)
    high = torch.quantile(torch.cat([up[:, :3].flatten(), down[:3].flatten()]), 0.9)
    assert clamped_up.abs().max() <= high + 1e-6 and clamped_down.abs().max() <= high + 1e-6
    assert not torch.equal(clamped_down.flatten(1), down[:3])


def test_decisions_explain_min_diff_and_the_rounding_floor():
    def stat(rel, dtype=torch.float32, max_abs=1e-5):
        floor = 1e4 * rounding_floor(dtype) ** 2
        return ComponentDiff(
            "te1", 12, 0, 1e4 * rel**2, 1e4, max_abs, floor, ("fp16" if dtype != torch.float32 else "fp32",)
        )

    small = decide(stat(3e-7), 1e-6)
    assert not small.extract and "--min-diff 1e-07 would extract it" in small.reason
    kept = decide(stat(1e-4), 1e-6)
    assert kept.extract and kept.warning is None and "silently dropped" in kept.reason
    noisy = decide(stat(3e-4, torch.float16), 1e-6)
    assert noisy.extract and "rounding noise" in noisy.warning and "fp32" in noisy.warning
    assert decide(stat(0.0), 1e-6).reason == "te1: skipped: unchanged (difference exactly zero in all 12 layers)"


def test_the_default_fast_svd_is_the_adaptive_block_krylov_one():
    from extract.layers import FactorSettings, truncated_svd
    from xlbake.lora.krylov import sketch_dtype, svd_adaptive

    cfg = ExtractConfig()
    settings = FactorSettings.from_config(cfg)
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(300, 200, generator=gen) @ torch.randn(200, 400, generator=gen)
    got = truncated_svd(m, 16, settings)
    sketch = sketch_dtype("auto", torch.float32, "cpu")  # bf16 on CPUs with AVX512-BF16 or AMX, else fp32
    assert settings.sketch == sketch
    want = svd_adaptive(m, 16, oversample=cfg.oversample, min_iters=cfg.power_iters, seed=cfg.seed, sketch=sketch)
    assert torch.equal(got.s, want.s) and torch.equal(got.u, want.u) and torch.equal(got.vh, want.vh)


def test_the_fast_svd_gets_the_layer_energy_read_with_the_difference(monkeypatch):
    import extract.layers as layers
    from xlbake.lora.names import LoraTarget

    seen, real = [], layers.svd_adaptive

    def spy(m, rank, **kw):
        seen.append(kw["energy"])
        return real(m, rank, **kw)

    monkeypatch.setattr(layers, "svd_adaptive", spy)
    settings = layers.FactorSettings.from_config(ExtractConfig())
    m = torch.randn(300, 400, generator=torch.Generator().manual_seed(2))
    energy = float(torch.linalg.vector_norm(m)) ** 2
    target = LoraTarget("lora_unet_x", "unet", "model.diffusion_model.x.weight", None, "linear", (300, 400))
    layers.factor_layer(target, m, energy, settings)
    assert seen == [energy]


def test_each_factoring_thread_reuses_one_workspace_for_the_fast_svd(tiny_paths, dense, tmp_path, monkeypatch):
    import threading

    import extract.layers as layers

    seen, real = [], layers.svd_adaptive

    def spy(m, rank, **kw):
        seen.append((threading.current_thread().name, kw["workspace"]))
        return real(m, rank, **kw)

    monkeypatch.setattr(layers, "svd_adaptive", spy)
    threads = torch.get_num_threads()
    try:
        for workers in (1, 2):
            seen.clear()
            torch.set_num_threads(workers)  # one factoring worker per torch thread
            _extract(tiny_paths.single_file, dense, tmp_path / f"{workers}.safetensors", dim=(4,))
            names = {name for name, _ in seen}
            assert len(seen) > 10 and all(workspace is not None for _, workspace in seen)
            for name in names:  # one per thread, reused for each of its layers
                assert len({id(workspace) for thread, workspace in seen if thread == name}) == 1
            assert len({id(workspace) for _, workspace in seen}) == len(names) == workers
    finally:
        torch.set_num_threads(threads)
