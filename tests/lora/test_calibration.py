"""Calibration files: shared moment groups, the /2 format, and the statistics' size on the real SDXL."""

import json

import pytest
import torch

from xlbake.errors import InputError
from xlbake.fileio import save_safetensors_atomic
from xlbake.lora.calibration import (
    Calibration,
    calibrated_targets,
    moment_for,
    moment_group,
    read_calibration,
    statistics_bytes,
    write_calibration,
)
from xlbake.lora.moments import compress
from xlbake.sdxl.configs import real_sdxl_sgm_shapes

BLOCK = "lora_unet_input_blocks_4_1_transformer_blocks_0_"


def test_layers_reading_one_input_share_its_group():
    assert {moment_group(BLOCK + f"attn1_to_{p}") for p in "qkv"} == {BLOCK + "attn1_qkv"}
    context = {moment_group(f"lora_unet_{b}_1_transformer_blocks_{i}_attn2_to_{p}") for b in ("input_blocks_4",
               "middle_block") for i in (0, 3) for p in "kv"}  # fmt: skip
    assert context == {"lora_unet_context"}
    assert moment_group(BLOCK + "attn2_to_q") == BLOCK + "attn2_to_q"  # reads the image tokens, not the text
    assert moment_group(BLOCK + "attn1_to_out_0") == BLOCK + "attn1_to_out_0"
    te2 = "lora_te2_text_model_encoder_layers_3_self_attn_"
    assert {moment_group(te2 + f"{p}_proj") for p in "qkv"} == {te2 + "qkv"}
    assert moment_group(te2 + "out_proj") == te2 + "out_proj"
    resnets = {moment_group(f"lora_unet_{b}_0_emb_layers_1") for b in ("input_blocks_1", "output_blocks_8")}
    assert resnets == {"lora_unet_time_embedding"}


def test_round_trip_and_old_format_refused(tmp_path):
    moment = compress(torch.diag(torch.arange(1.0, 7.0)), rank=2)
    modules = {BLOCK + f"attn1_to_{p}": BLOCK + "attn1_qkv" for p in "qkv"}
    path = write_calibration(Calibration({BLOCK + "attn1_qkv": moment}, modules, {"base": "b"}), tmp_path / "c.st")
    found = read_calibration(path)
    assert found.modules == modules and found.metadata == {"base": "b"}
    torch.testing.assert_close(moment_for(found, BLOCK + "attn1_to_v").dense(), moment.dense())
    assert moment_for(found, BLOCK + "attn2_to_q") is None
    old = save_safetensors_atomic({"x": torch.eye(2)}, tmp_path / "old.st", {"format": "xlbake-calibration/1"})
    with pytest.raises(InputError, match="old calibration file .*recompute"):
        read_calibration(old)
    broken = save_safetensors_atomic({"x": torch.eye(2)}, tmp_path / "broken.st", {
        "format": "xlbake-calibration/2", "modules": json.dumps({"a": "g"})})  # fmt: skip
    with pytest.raises(InputError, match="incomplete"):
        read_calibration(broken)


def test_real_sdxl_statistics_fit_in_4_gb():
    shapes = real_sdxl_sgm_shapes()
    dense = 4 * sum(t.shape[1] ** 2 for t in calibrated_targets(shapes))  # one dense fp32 moment per module
    assert dense > 16e9
    assert statistics_bytes(shapes) <= 4e9
