"""Intermediate checkpoints: the fp32 copies `make extract-epochs` reads, pruned with their checkpoint."""

import pytest
from safetensors import safe_open

from finetune.outputs import Weights, save_intermediate
from xlbake.sdxl.tiny import build_tiny_components

UNET_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


@pytest.fixture(scope="module")
def weights():
    parts = build_tiny_components()
    dicts = {name: parts[name].state_dict() for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    return [Weights(**dicts, kind="raw")]


def _dtype(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_slice(UNET_KEY).get_dtype()


def test_keep_fp32_writes_an_fp32_copy_and_keep_last_prunes_both(weights, tmp_path):
    for tag in ("epoch-0001", "epoch-0002", "epoch-0003"):
        save_intermediate(tmp_path, tag, weights, "fp16", keep_last=2, metadata={}, keep_fp32=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"epoch-000{i}{kind}.safetensors" for i in (2, 3) for kind in (".fp32", "")]
    folder = tmp_path / "checkpoints"
    assert (_dtype(folder / "epoch-0003.fp32.safetensors"), _dtype(folder / "epoch-0003.safetensors")) == ("F32", "F16")


def test_no_copy_when_the_checkpoints_are_fp32_or_not_asked(weights, tmp_path):
    save_intermediate(tmp_path, "step-1", weights, "fp32", keep_last=0, metadata={}, keep_fp32=True)
    save_intermediate(tmp_path, "step-2", weights, "fp16", keep_last=0, metadata={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1.safetensors", "step-2.safetensors"]
    assert _dtype(tmp_path / "checkpoints/step-1.safetensors") == "F32"
