"""python -m extract: flags, config file, dry run, and every bad input ending in one clear line, exit 1, no file."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from extract.cli import main
from extract.config import ExtractConfig
from xlbake.config import describe, load_config
from xlbake.lora.io import read_lora
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint

LAYER = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "extract.yaml"
MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def weights(tiny_paths):
    with open_checkpoint(tiny_paths.single_file) as reader:
        return {key: reader.get(key).clone() for key in reader}


@pytest.fixture(scope="module")
def tuned(weights, tmp_path_factory):
    """The tiny model with one UNet attention layer changed (rank 1)."""
    changed = dict(weights)
    out_features, in_features = changed[LAYER].shape
    changed[LAYER] = changed[LAYER] + 1e-3 * torch.outer(torch.linspace(-1, 1, out_features), torch.ones(in_features))
    return save_sgm_checkpoint(changed, tmp_path_factory.mktemp("tuned") / "tuned.safetensors")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_makefile_command_writes_the_lora_and_prints_decisions(tiny_paths, tuned, tmp_path):
    out = tmp_path / "lora-dim4.safetensors"
    result = run(
        "--base", tiny_paths.single_file, "--tuned", tuned, "--dim", 4, "--conv-dim", 0, "--out", out, "--force"
    )
    assert result.exit_code == 0, result.output
    assert "te1: skipped: unchanged" in result.output and "unet: extracted" in result.output
    assert "kept energy" in result.output
    lora = read_lora(out)
    assert set(lora.modules) == {MODULE} and lora.modules[MODULE].rank == 4
    assert out.with_name("lora-dim4.report.json").is_file() and out.with_name("lora-dim4.report.png").is_file()


def test_diffusers_folder_base_with_fp16_tuned_prints_the_rounding_floor(tiny_paths, weights, tuned, tmp_path):
    with open_checkpoint(tuned) as reader:
        half = save_sgm_checkpoint(
            {k: reader.get(k) for k in reader}, tmp_path / "t16.safetensors", dtype=torch.float16
        )
    out = tmp_path / "lora.safetensors"
    result = run("--base", tiny_paths.diffusers_dir, "--tuned", half, "--dim", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert "rounding floor of the tuned fp16 weights 2.1e-04" in result.output
    # TE1 did not change: from an fp16 copy of an fp32 base its whole difference is rounding, and we say so
    assert re.search(r"warning: te1: .* about (9\d|100)% of its energy is rounding noise", result.output)
    assert out.is_file()


@pytest.mark.parametrize(("prediction", "label"), [("epsilon", "epsilon"), ("v_prediction", "v")])
def test_lora_and_its_resize_say_the_tuned_models_prediction_type(tiny_paths, tuned, tmp_path, prediction, label):
    """A v-prediction tuned file (with its v_pred key) extracts, and the LoRA says v, as does its resized copy."""
    from resize.cli import main as resize_main

    with open_checkpoint(tuned) as reader:
        tensors = {k: reader.get(k) for k in reader}
    labelled = save_sgm_checkpoint(tensors, tmp_path / "tuned.safetensors", prediction=prediction)
    out = tmp_path / "lora.safetensors"
    result = run("--base", tiny_paths.single_file, "--tuned", labelled, "--dim", 2, "--conv-dim", 0, "--out", out)
    assert result.exit_code == 0, result.output
    assert read_lora(out).metadata["modelspec.prediction_type"] == label
    resized = tmp_path / "lora-rank1.safetensors"
    result = CliRunner().invoke(resize_main, ["--lora", str(out), "--rank", "1", "--out", str(resized)])
    assert result.exit_code == 0, result.output
    assert read_lora(resized).metadata["modelspec.prediction_type"] == label


def test_config_file_keys_and_flags_resolve_together(tmp_path):
    config = tmp_path / "extract.yaml"
    config.write_text("base: models/base.safetensors\ndim: [8, 16]\nsave_precision: bf16\n")
    result = run("--config", config, "--dim", "4,32", "--tuned", "t.safetensors", "--out", "o.safetensors", "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["dim"] == [4, 32] and resolved["save_precision"] == "bf16"
    assert resolved["base"] == str(tmp_path / "models" / "base.safetensors"), "relative to the config file"


def test_flags_win_over_set_which_wins_over_the_config_file(tmp_path):
    """The rule of every stage (docs/architecture.md): a flag beats ``--set``, which beats the config file."""
    config = tmp_path / "extract.yaml"
    config.write_text("dim: [8]\nsave_precision: bf16\nseed: 3\n")
    paths = ("--tuned", "t.safetensors", "--base", "b.safetensors", "--out", "o.safetensors")
    overrides = ("--set", "dim=[16]", "--set", "save_precision=fp32")
    result = run("--config", config, *overrides, "--dim", "4", *paths, "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert (resolved["dim"], resolved["save_precision"], resolved["seed"]) == ([4], "fp32", 3)


def test_shipped_config_has_every_option_with_its_default_and_every_option_is_documented():
    shipped = yaml.safe_load(SHIPPED.read_text())
    docs = describe(ExtractConfig)
    assert set(shipped) == {doc.key for doc in docs}
    assert all(doc.doc for doc in docs), [doc.key for doc in docs if not doc.doc]
    assert load_config(ExtractConfig, SHIPPED) == ExtractConfig()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dim", "0"], "dim: ranks must be >= 1"),
        (["--rank-method", "sv_fro"], "needs a rank_value"),
        (["--size", "100 parsecs"], "unknown unit"),
        (["--size", "1MB", "--dim", "8,16"], "give one dim"),
        (["--clamp-quantile", "1.5"], "clamp_quantile"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_options_are_one_config_error(flags, message, tmp_path):
    result = run("--base", "b.safetensors", "--tuned", "t.safetensors", "--out", tmp_path / "o.safetensors", *flags)
    assert result.exit_code == 1 and message in result.output, result.output
    assert not list(tmp_path.iterdir())


def _bad_inputs(tiny_paths, tuned, weights, tmp):
    """name -> (base, tuned, out, expected text); each input file is built here."""
    out = tmp / "out" / "lora.safetensors"
    other = dict(weights)
    other[LAYER] = torch.zeros(other[LAYER].shape[0], other[LAYER].shape[1] + 1)
    different = save_sgm_checkpoint(other, tmp / "different.safetensors")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp / "foo.safetensors"))
    data = tuned.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    broken = dict(weights)
    broken[LAYER] = broken[LAYER].clone()
    broken[LAYER][0, 0] = float("nan")
    nan = save_sgm_checkpoint(broken, tmp / "nan.safetensors")
    same = shutil.copy(tiny_paths.single_file, tmp / "copy.safetensors")
    exists = tmp / "exists" / "lora.safetensors"
    exists.parent.mkdir()
    exists.write_bytes(b"keep me")
    (tmp / "a_file").write_text("not a folder")
    base = tiny_paths.single_file
    return {
        "different architectures": (base, different, out, f"{LAYER} has shape"),
        "not SDXL": (base, tmp / "foo.safetensors", out, "not an SDXL checkpoint"),
        "truncated": (base, tmp / "truncated.safetensors", out, "truncated"),
        "NaN weight": (base, nan, out, f"{LAYER} holds NaN/Inf"),
        "NaN base weight": (nan, tuned, out, f"{nan}: {LAYER} holds NaN/Inf"),
        "base is tuned": (base, base, out, "same file as --base"),
        "identical copy": (base, same, out, "identical to"),
        "existing output": (base, tuned, exists, "output exists; pass --force"),
        "unwritable folder": (base, tuned, tmp / "a_file" / "lora.safetensors", "cannot create output folder"),
        "missing input": (tmp / "nowhere.safetensors", tuned, out, "no such file"),
    }


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_each_bad_input_is_one_clear_line_exit_1_and_no_file(tiny_paths, tuned, weights, tmp_path):
    cases = _bad_inputs(tiny_paths, tuned, weights, tmp_path)
    for name, (base, tuned_file, out, expected) in cases.items():
        before = _files(tmp_path)
        result = run("--base", base, "--tuned", tuned_file, "--out", out, "--dim", 2)
        assert result.exit_code == 1, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and expected in errors[0], (name, result.output)
        assert "Traceback" not in result.output, name
        assert _files(tmp_path) == before, f"{name}: a file was written"
    assert (tmp_path / "exists" / "lora.safetensors").read_bytes() == b"keep me"


def test_umbrella_command_and_module_entry_point():
    from xlbake.cli import main as xlbake

    result = CliRunner().invoke(xlbake, ["extract", "--help"])
    assert result.exit_code == 0 and "--conv-dim" in result.output and "--size" in result.output
    module = subprocess.run([sys.executable, "-m", "extract", "--help"], capture_output=True, text=True, timeout=120)
    assert module.returncode == 0 and "--tuned" in module.stdout
