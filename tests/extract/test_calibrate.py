"""Calibrated (activation-aware) extraction: the statistics pass and the whitened factorization on the tiny model."""

import json

import pytest
import torch
import yaml

from extract.calibrate import CALIBRATION_NAME, calibrate_run, calibrated_targets
from extract.config import ExtractConfig
from extract.pipeline import run_extract
from xlbake.errors import ConfigError, InputError
from xlbake.fileio import save_safetensors_atomic
from xlbake.fingerprint import fingerprint
from xlbake.lora.calibration import FORMAT, read_calibration
from xlbake.lora.io import read_lora
from xlbake.lora.lowrank import to_matrix
from xlbake.lora.names import kohya_targets
from xlbake.lora.whiten import whitened_error, whitened_factors
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint

LAYER = "input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def tuned(tiny_paths, tmp_path_factory):
    """Tuned = base + full-rank random differences (1e-2 of the weights) in every non-3x3 UNet LoRA layer."""
    with open_checkpoint(tiny_paths.single_file) as reader:
        weights = {key: reader.get(key).clone() for key in reader}
    gen = torch.Generator().manual_seed(0)
    for target in kohya_targets({k: tuple(v.shape) for k, v in weights.items()}, conv=False):
        if target.component == "unet":
            delta = torch.randn(weights[target.key].shape, generator=gen)
            weights[target.key] += delta * (1e-2 * weights[target.key].norm() / delta.norm())
    return save_sgm_checkpoint(weights, tmp_path_factory.mktemp("tuned") / "tuned.safetensors")


def _moments(base, out, moment_of):
    """A calibration file for ``base`` with moment_of(target) for every calibrated target."""
    with open_checkpoint(base) as reader:
        targets = calibrated_targets(reader.shapes())
    moments = {t.name: moment_of(t) for t in targets}
    meta = {"format": FORMAT, "base": base.name, "base_fingerprint": fingerprint(base), "images": "0"}
    return save_safetensors_atomic(moments, out, meta)


def _modules(path):
    return {name: (to_matrix(m.up).double(), to_matrix(m.down).double()) for name, m in read_lora(path).modules.items()}


def _extract(base, tuned, out, **options):
    cfg = ExtractConfig(base=base, tuned=tuned, out=out, save_precision="fp32", svd="exact", dim=(4,), **options)
    return run_extract(cfg, echo=lambda _: None).outputs[0]


def _delta(base, tuned, name):
    target = next(t for t in kohya_targets(open_checkpoint(base).shapes(), conv=False) if t.name == name)
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        return to_matrix(t.get(target.key).double() - b.get(target.key).double())


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

    def anisotropic(target):
        basis = torch.linalg.qr(torch.randn(target.shape[1], target.shape[1], generator=gen)).Q
        return (basis * torch.logspace(0, -4, target.shape[1])) @ basis.T

    calibration = _moments(base, tmp_path / "c.safetensors", anisotropic)
    moments = read_calibration(calibration).moments
    plain_path = _extract(base, tuned, tmp_path / "plain.safetensors")
    cal_path = _extract(base, tuned, tmp_path / "cal.safetensors", calibration=calibration)
    plain, calibrated = _modules(plain_path), _modules(cal_path)
    name = "lora_unet_" + LAYER
    delta = _delta(base, tuned, name)
    optimum = whitened_error(delta, *whitened_factors(delta, moments[name], 4)[:2], moments[name])
    error = whitened_error(delta, *calibrated[name], moments[name])
    assert error == pytest.approx(optimum, rel=1e-3)  # the golden whitened optimum, through the whole pipeline
    assert error < 0.9 * whitened_error(delta, *plain[name], moments[name])
    meta = read_lora(cal_path).metadata
    assert json.loads(meta["xlbake_calibration"])["base"] == base.name
    assert json.loads(meta["xlbake_extract"])["calibration"] == "c.safetensors"
    assert "xlbake_calibration" not in read_lora(plain_path).metadata


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
    assert set(found.moments) == {t.name for t in targets}
    for target in targets:
        moment = found.moments[target.name].double()
        assert moment.shape == (target.shape[1], target.shape[1])
        assert float(torch.linalg.eigvalsh(moment)[0]) > -1e-4 * float(moment.trace()) and moment.trace() > 0
    assert found.metadata["images"] == "2" and found.metadata["base"] == tiny_paths.single_file.name
    calibrate_run(run, tiny_paths.single_file, images=2, echo=lines.append)
    assert "reusing" in lines[-1]
    other = save_sgm_checkpoint({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="delete it to recompute"):
        calibrate_run(run, other, echo=lines.append)


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
