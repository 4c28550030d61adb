"""Loading the base for training (finetune.model): what a fresh box with only a single-file base gets."""

from __future__ import annotations

import pytest
import torch

from finetune.config import SDXL_HUB_ID
from finetune.model import load_model
from xlbake.errors import InputError
from xlbake.tiny import build_tokenizers


def test_single_file_with_default_components_needs_no_components_folder(tiny_paths):
    from_file = load_model(tiny_paths.single_file, SDXL_HUB_ID)
    from_folder = load_model(tiny_paths.diffusers_dir, SDXL_HUB_ID)
    for part in ("unet", "te1", "te2"):
        for (name, a), (_, b) in zip(
            from_file.part(part).state_dict().items(), from_folder.part(part).state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert from_file.tokenizer.get_vocab() == build_tokenizers()[0].get_vocab()
    assert torch.equal(from_file.noise_scheduler.alphas_cumprod, from_folder.noise_scheduler.alphas_cumprod)


def test_real_sdxl_single_file_offline_without_tokenizers_says_what_to_download(hub_cache, sdxl_header_only):
    with pytest.raises(InputError) as info:
        load_model(sdxl_header_only, SDXL_HUB_ID)
    message = str(info.value)
    assert "\n" not in message
    assert f"hf download {SDXL_HUB_ID} --include 'tokenizer/*' 'tokenizer_2/*'" in message
    assert "model.components" in message


def test_missing_tokenizers_refuse_the_start_before_the_run_folder_is_touched(hub_cache, sdxl_header_only, tmp_path):
    from click.testing import CliRunner

    from finetune.cli import main

    run_dir = tmp_path / "run"
    sets = [f"model.base={sdxl_header_only}", f"run_dir={run_dir}", "data.roots=[builtin:demo]"]
    result = CliRunner().invoke(main, [arg for value in sets for arg in ("--set", value)])
    assert result.exit_code == 1
    assert "hf download" in result.output and "Traceback" not in result.output
    assert not run_dir.exists()
