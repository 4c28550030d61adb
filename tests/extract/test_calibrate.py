"""Calibrated (activation-aware) extraction: the statistics pass and the whitened factorization on the tiny model."""

import json
import math

import pytest
import torch
import yaml

from extract.calibrate import CALIBRATION_NAME, calibrate_run
from extract.config import ExtractConfig
from extract.pipeline import run_extract
from xlbake.errors import ConfigError, InputError
from xlbake.fingerprint import fingerprint
from xlbake.lora.calibration import Calibration, calibrated_targets, moment_for, read_calibration, write_calibration
from xlbake.lora.io import read_lora
from xlbake.lora.lowrank import to_matrix
from xlbake.lora.moments import compress
from xlbake.lora.names import kohya_targets
from xlbake.lora.whiten import whitened_error, whitened_factors
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint

LAYER = "input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def tuned(tiny_paths, tmp_path_factory):
    """Tuned = base + full-rank random differences (1e-2 of the weights) in every UNet LoRA layer, 3x3 convs too."""
    with open_checkpoint(tiny_paths.single_file) as reader:
        weights = {key: reader.get(key).clone() for key in reader}
    gen = torch.Generator().manual_seed(0)
    for target in kohya_targets({k: tuple(v.shape) for k, v in weights.items()}, conv=True):
        if target.component == "unet":
            delta = torch.randn(weights[target.key].shape, generator=gen)
            weights[target.key] += delta * (1e-2 * weights[target.key].norm() / delta.norm())
    return save_sgm_checkpoint(weights, tmp_path_factory.mktemp("tuned") / "tuned.safetensors")


def _moments(base, out, moment_of, rank=None):
    """A calibration file for ``base`` with moment_of(target) for every calibrated target, each its own, exact
    (or compressed to ``rank`` eigenpairs)."""
    with open_checkpoint(base) as reader:
        targets = calibrated_targets(reader.shapes())
    moments = {
        t.name: compress(moment_of(t), rank=rank or t.shape[1], taps=torch.eye(9) if t.kind == "conv3x3" else None)
        for t in targets
    }
    meta = {"base": base.name, "base_fingerprint": fingerprint(base), "images": "0"}
    return write_calibration(Calibration(moments, {name: name for name in moments}, meta), out)


def _modules(path):
    return {name: (to_matrix(m.up).double(), to_matrix(m.down).double()) for name, m in read_lora(path).modules.items()}


def _extract(base, tuned, out, **options):
    cfg = ExtractConfig(base=base, tuned=tuned, out=out, save_precision="fp32", svd="exact", dim=(4,), **options)
    return run_extract(cfg, echo=lambda _: None).outputs[0]


def _delta(base, tuned, name):
    target = next(t for t in kohya_targets(open_checkpoint(base).shapes(), conv=True) if t.name == name)
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        return to_matrix(t.get(target.key).double() - b.get(target.key).double())


def _anisotropic(gen: torch.Generator, low: int):
    """Moments C (in, in) of a target with eigenvalues from 1 down to 10^low along random directions."""

    def moment(target):
        basis = torch.linalg.qr(torch.randn(target.shape[1], target.shape[1], generator=gen)).Q
        return (basis * torch.logspace(0, low, target.shape[1])) @ basis.T

    return moment


def test_identity_statistics_give_the_plain_lora(tiny_paths, tuned, tmp_path):
    base = tiny_paths.single_file
    calibration = _moments(base, tmp_path / "c.safetensors", lambda t: torch.eye(t.shape[1]))
    plain = _modules(_extract(base, tuned, tmp_path / "plain.safetensors"))
    calibrated = _modules(_extract(base, tuned, tmp_path / "cal.safetensors", calibration=calibration))
    assert plain.keys() == calibrated.keys()
    for name, (up, down) in plain.items():
        torch.testing.assert_close(calibrated[name][0] @ calibrated[name][1], up @ down, rtol=1e-4, atol=1e-6)


def test_calibrated_lora_keeps_more_of_the_effect_on_the_calibrated_inputs(tiny_paths, tuned, tmp_path):
    base = tiny_paths.single_file
    gen = torch.Generator().manual_seed(1)

    anisotropic = _anisotropic(gen, -4)

    calibration = _moments(base, tmp_path / "c.safetensors", anisotropic)
    found = read_calibration(calibration)
    plain_path = _extract(base, tuned, tmp_path / "plain.safetensors")
    cal_path = _extract(base, tuned, tmp_path / "cal.safetensors", calibration=calibration)
    plain, calibrated = _modules(plain_path), _modules(cal_path)
    name = "lora_unet_" + LAYER
    delta = _delta(base, tuned, name)
    moment = moment_for(found, name).dense()
    optimum = whitened_error(delta, *whitened_factors(delta, moment, 4)[:2], moment)
    error = whitened_error(delta, *calibrated[name], moment)
    assert error == pytest.approx(optimum, rel=1e-3)  # the golden whitened optimum, through the whole pipeline
    assert error < 0.9 * whitened_error(delta, *plain[name], moment)
    meta = read_lora(cal_path).metadata
    assert json.loads(meta["xlbake_calibration"])["base"] == base.name
    assert json.loads(meta["xlbake_extract"])["calibration"] == "c.safetensors"
    assert "xlbake_calibration" not in read_lora(plain_path).metadata


def test_compressed_statistics_give_the_whitened_optimum_of_the_compressed_metric(tiny_paths, tuned, tmp_path):
    base = tiny_paths.single_file
    gen = torch.Generator().manual_seed(2)

    anisotropic = _anisotropic(gen, -3)

    calibration = _moments(base, tmp_path / "c.safetensors", anisotropic, rank=4)  # S never formed: 2·4 < in
    cal_path = _extract(base, tuned, tmp_path / "cal.safetensors", calibration=calibration)
    name = "lora_unet_" + LAYER
    moment = moment_for(read_calibration(calibration), name)
    assert moment.rank == 4 < moment.size // 2
    delta, compressed = _delta(base, tuned, name), moment.dense()
    optimum = whitened_error(delta, *whitened_factors(delta, compressed, 4)[:2], compressed)
    assert whitened_error(delta, *_modules(cal_path)[name], compressed) == pytest.approx(optimum, rel=1e-3)


@pytest.mark.parametrize("convs", [True, False])
def test_3x3_convs_are_whitened_by_their_kronecker_statistics_only_when_asked(tiny_paths, tuned, tmp_path, convs):
    from xlbake.lora.lowrank import split_factors, svd_exact
    from xlbake.lora.moments import moment_whitening
    from xlbake.lora.whiten import DAMPING, unwhiten, whiten

    base = tiny_paths.single_file
    gen = torch.Generator().manual_seed(3)
    taps = torch.eye(9) + 0.5 * torch.ones(9, 9)  # neighbouring pixels correlate

    anisotropic = _anisotropic(gen, -3)

    with open_checkpoint(base) as reader:
        targets = calibrated_targets(reader.shapes())
    moments = {t.name: compress(anisotropic(t), taps=taps if t.kind == "conv3x3" else None) for t in targets}
    meta = {"base": base.name, "base_fingerprint": fingerprint(base), "images": "0"}
    calibration = write_calibration(Calibration(moments, {n: n for n in moments}, meta), tmp_path / "c.safetensors")
    cfg = ExtractConfig(base=base, tuned=tuned, out=tmp_path / "cal.safetensors", save_precision="fp32", svd="exact",
                        dim=(4,), conv_dim=(3,), calibration=calibration, calibrate_convs=convs)  # fmt: skip
    name = "lora_unet_input_blocks_1_0_in_layers_2"
    module = read_lora(run_extract(cfg, echo=lambda _: None).outputs[0]).modules[name]
    assert next(t for t in targets if t.name == name).kind == "conv3x3"
    delta = _delta(base, tuned, name)
    got = module.scale * to_matrix(module.up).double() @ to_matrix(module.down).double()
    if not convs:  # the default: 3x3 convs factored plainly, Linear layers still whitened
        up, down = split_factors(svd_exact(delta.double(), 3), 3)
        torch.testing.assert_close(got, up @ down, rtol=1e-4, atol=1e-6)
        return
    factor = moment_whitening(read_calibration(calibration).moments[name], DAMPING)
    up, down = split_factors(svd_exact(whiten(delta, factor), 3), 3)
    torch.testing.assert_close(got, up @ unwhiten(down, factor), rtol=1e-4, atol=1e-6)


def test_calibration_of_another_base_and_both_options_are_refused(tiny_paths, tuned, tmp_path):
    calibration = _moments(tuned, tmp_path / "c.safetensors", lambda t: torch.eye(t.shape[1]))
    with pytest.raises(InputError, match="not from --base"):
        _extract(tiny_paths.single_file, tuned, tmp_path / "x.safetensors", calibration=calibration)
    with pytest.raises(ConfigError, match="not both"):
        ExtractConfig(calibration=calibration, calibrate=tmp_path)


def test_calibrate_run_collects_every_layers_input_moment_and_reuses_the_file(tiny_paths, demo_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    data = {"roots": [str(demo_dataset)], "resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {**data, "bucket_step": 8}}))
    lines = []
    path = calibrate_run(run, tiny_paths.single_file, images=2, echo=lines.append)
    assert path == run / CALIBRATION_NAME
    found = read_calibration(path)
    with open_checkpoint(tiny_paths.single_file) as reader:
        targets = calibrated_targets(reader.shapes())
    assert set(found.modules) == {t.name for t in targets}
    for target in targets:
        moment = moment_for(found, target.name).dense()
        width = math.prod(target.shape[1:])  # a 3x3 conv's: C ⊗ T over its unfolded patches
        assert moment.shape == (width, width)
        assert (moment_for(found, target.name).taps is not None) == (target.kind == "conv3x3")
        assert float(torch.linalg.eigvalsh(moment)[0]) > -1e-4 * float(moment.trace()) and moment.trace() > 0
    assert found.metadata["images"] == "2" and found.metadata["base"] == tiny_paths.single_file.name
    calibrate_run(run, tiny_paths.single_file, images=2, echo=lines.append)
    assert "reusing" in lines[-1]
    other = save_sgm_checkpoint({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="delete it to recompute"):
        calibrate_run(run, other, echo=lines.append)


def test_layers_of_one_moment_group_read_the_very_same_input(tiny_paths):
    """q/k/v, all cross-attention k/v and all ResNet time projections share a moment: check that the tiny SDXL's
    modules really see identical tensors (hooking every member, as format /1 did), so sharing loses nothing."""
    from extract.calibrate import collect_moments, target_modules
    from xlbake.evaluate.grid import ModelWeights
    from xlbake.lora.calibration import moment_group
    from xlbake.sdxl.models import resolve_architecture
    from xlbake.sdxl.parts import MODEL_PARTS

    base = tiny_paths.single_file
    arch = resolve_architecture(base, None)
    with open_checkpoint(base) as reader:
        weights = ModelWeights.load(reader, arch, (*MODEL_PARTS, "vae"), device=torch.device("cpu"),
                                    dtype=torch.float32)  # fmt: skip
        modules = target_modules(weights.models, reader.shapes())
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = collect_moments(arch, weights.models, modules, [(pixels, "a photo")], timesteps=2, seed=0)
    groups: dict[str, list[str]] = {}
    for name in moments:
        groups.setdefault(moment_group(name), []).append(name)
    shared = {group: names for group, names in groups.items() if len(names) > 1}
    assert {"lora_unet_context", "lora_unet_time_embedding"} <= set(shared)
    assert any(g.endswith("attn1_qkv") for g in shared) and any(g.startswith("lora_te2") for g in shared)
    for names in shared.values():
        for name in names[1:]:
            assert torch.equal(moments[name][0], moments[names[0]][0]), name


def test_conv_statistics_are_the_im2col_moment_when_it_is_a_kronecker_product():
    """Channels that are one spatial field scaled per channel have an exactly Kronecker im2col moment (a aᵀ) ⊗ Z:
    the hook's channel moment ⊗ tap moment is that moment, up to the scalar the padded border makes."""
    from extract.calibrate import moment_hooks
    from xlbake.lora.moments import tap_moment

    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(6, 4, 3, padding=1)
    field = torch.randn(2, 1, 8, 8, generator=gen)
    x = field * torch.randn(1, 6, 1, 1, generator=gen)
    with moment_hooks({"conv": conv}) as sums, torch.no_grad():
        conv(x)
    entry = sums["conv"]
    estimate = torch.kron(entry.moment.double() / entry.rows, tap_moment(entry.taps))
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 54).double()
    exact = patches.mT @ patches / patches.shape[0]
    ratio = float(torch.trace(estimate) / torch.trace(exact))
    torch.testing.assert_close(estimate / ratio, exact, rtol=1e-4, atol=1e-6)
    assert 0.9 < ratio < 1.3  # all pixels vs zero-padded patches: close to one


def test_statistics_of_the_wrong_kind_are_refused():
    from extract.calibrate import whitening_for
    from xlbake.lora.names import LoraTarget

    conv = LoraTarget("lora_unet_x", "unet", "k", None, "conv3x3", (4, 3, 3, 3))
    plain = Calibration({"lora_unet_x": compress(torch.eye(3))}, {"lora_unet_x": "lora_unet_x"}, {})
    with pytest.raises(InputError, match="conv3x3, its statistics are not"):
        whitening_for(plain, conv)
    linear = LoraTarget("lora_unet_x", "unet", "k", None, "linear", (4, 5))
    with pytest.raises(InputError, match="has 3 inputs, the model 5"):
        whitening_for(plain, linear)


def test_calibrate_run_uses_only_the_calibration_half_of_the_images(tiny_paths, demo_dataset, tmp_path):
    from xlbake.data.run_images import read_run, run_items, split_items

    run = tmp_path / "run"
    run.mkdir()
    data = {"roots": [str(demo_dataset)], "resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {**data, "bucket_step": 8}}))
    found = read_calibration(calibrate_run(run, tiny_paths.single_file, images=100, echo=lambda _: None)).metadata
    half = {item.image.name for item in split_items(run_items(read_run(run), seed=0), "calibration")}
    assert sorted(json.loads(found["image_files"])) == sorted(half) and len(half) == 4
    assert found["split"] == "calibration"
