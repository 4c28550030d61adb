"""Prediction type labels end to end: a finetune labels every output by loss.prediction (single files, diffusers
folder, samples), refuses a base that declares the other type unless overridden, and the LoRA extracted from it
says the same."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_run import tiny_run_sections

from finetune.cli import check_start
from finetune.config import FinetuneConfig
from finetune.trainer import run
from xlbake.config import load_config
from xlbake.errors import ConfigError
from xlbake.lora.io import read_lora

LABELS = {"epsilon": "epsilon", "v_prediction": "v"}


def make_config(tiny_paths, demo_dataset, run_dir: Path, *overrides: str) -> FinetuneConfig:
    """Two optimizer steps of batch 1, a checkpoint after the first, the diffusers folder and one 32 px sample."""
    data = {
        **tiny_run_sections(tiny_paths, demo_dataset, run_dir),
        "train": {"epochs": 1, "max_steps": 2},
        "optim": {"unet_lr": 1e-4, "te1_lr": 0, "te2_lr": 0},
        "precision": {"mixed": "no"},
        "checkpoint": {"every_steps": 1, "diffusers": True},
        "sample": {"prompts": ["xlbk emblem"], "steps": 1, "width": 32, "height": 32},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    return load_config(FinetuneConfig, data=data, overrides=overrides)


def label_of(path: Path) -> tuple[str, bool]:
    """(modelspec.prediction_type, whether the v_pred key is there) of a single file."""
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()["modelspec.prediction_type"], "v_pred" in set(handle.keys())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_finetune_outputs_samples_and_lora_follow_loss_prediction(
    prediction, tiny_paths, demo_dataset, tmp_path, monkeypatch
):
    from diffusers import StableDiffusionXLPipeline

    from extract.cli import main as extract_main

    sampled: list[str] = []

    def fake_call(pipe, *args, **kwargs):  # what matters is the scheduler the samples are drawn with
        sampled.append(pipe.scheduler.config.prediction_type)
        assert kwargs["output_type"] == "latent"  # the VAE decodes outside the pipeline (autocast off)
        return SimpleNamespace(images=torch.zeros(1, pipe.vae.config.latent_channels, 4, 4))

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", fake_call)
    cfg = make_config(tiny_paths, demo_dataset, tmp_path / "run", f"loss.prediction={prediction}")
    run(cfg)  # the trainer itself, as after check_start (which would want an override for v_prediction here)
    out = cfg.run_dir
    expected = (LABELS[prediction], prediction == "v_prediction")
    for name in ("tuned.safetensors", "tuned.fp32.safetensors", "checkpoints/step-00000001.safetensors"):
        assert label_of(out / name) == expected, name
    scheduler = json.loads((out / "tuned-diffusers/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    assert sampled == [prediction]
    lora = tmp_path / "lora.safetensors"
    args = ["--base", tiny_paths.single_file, "--tuned", out / "tuned.fp32.safetensors", "--dim", 2, "--out", lora]
    result = CliRunner().invoke(extract_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert read_lora(lora).metadata["modelspec.prediction_type"] == LABELS[prediction]


@pytest.fixture(scope="module")
def bases(tiny_paths, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as a ComfyUI-labelled v-prediction single file and as a v-prediction diffusers folder."""
    folder = tmp_path_factory.mktemp("bases")
    single = folder / "vpred.safetensors"
    save_file({**load_file(tiny_paths.single_file), "v_pred": torch.tensor([])}, single)
    diffusers_dir = shutil.copytree(tiny_paths.diffusers_dir, folder / "vpred-diffusers")
    config_file = diffusers_dir / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    return {"single": single, "folder": diffusers_dir, "epsilon": tiny_paths.single_file}


@pytest.mark.parametrize(
    ("base", "prediction", "says"),
    [
        ("single", "epsilon", r"v_pred key"),
        ("folder", "epsilon", r"prediction_type: v_prediction in scheduler/scheduler_config\.json"),
        ("epsilon", "v_prediction", r"modelspec\.prediction_type: epsilon"),
    ],
)
def test_check_start_refuses_a_base_that_declares_the_other_type(
    base, prediction, says, bases, tiny_paths, demo_dataset, tmp_path
):
    overrides = (f"model.base={bases[base]}", f"loss.prediction={prediction}")
    cfg = make_config(tiny_paths, demo_dataset, tmp_path / "run", *overrides)
    with pytest.raises(ConfigError) as refused:
        check_start(cfg, None, False)
    message = str(refused.value)
    assert "\n" not in message and re.search(says, message) and str(bases[base]) in message
    assert f"loss.prediction: {prediction}" in message and "loss.prediction_override: true" in message
    forced = make_config(tiny_paths, demo_dataset, tmp_path / "run", *overrides, "loss.prediction_override=true")
    assert check_start(forced, None, False) is not None
    other = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[prediction]
    agreeing = make_config(tiny_paths, demo_dataset, tmp_path / "run", overrides[0], f"loss.prediction={other}")
    assert check_start(agreeing, None, False) is not None


def test_cli_refuses_before_loading_the_model(bases, tiny_paths, demo_dataset, tmp_path, monkeypatch):
    import finetune.trainer
    from finetune.cli import main

    monkeypatch.setattr(finetune.trainer, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = tmp_path / "train.yaml"
    config.write_text(
        json.dumps(
            {
                **tiny_run_sections(tiny_paths, demo_dataset, tmp_path / "run"),
                "model": {"base": str(bases["single"]), "components": str(tiny_paths.diffusers_dir)},
            }
        )
    )
    result = CliRunner().invoke(main, ["--config", str(config)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "v_pred" in result.output
    assert not (tmp_path / "run").exists()
