"""Loading the base for training (finetune.model): what a fresh box with only a single-file base gets."""

from __future__ import annotations

import pytest
import torch

from finetune.config import SDXL_HUB_ID
from finetune.model import load_model
from xlbake.errors import InputError
from xlbake.sdxl.tiny import build_tokenizers


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


def test_real_sdxl_single_file_fits_the_built_architecture(hub_cache, sdxl_header_only, monkeypatch):
    """The whole key/shape mapping of a real-size file, with meta tensors standing in for its 7 GB of weights."""
    from xlbake.sdxl.checkpoint import CheckpointReader
    from xlbake.sdxl.models import SDXL_HUB_ID as HUB_ID
    from xlbake.sdxl.tiny import save_tokenizers_as_hub_cache

    save_tokenizers_as_hub_cache(hub_cache, HUB_ID)
    monkeypatch.setattr(
        CheckpointReader, "get", lambda self, key: torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")
    )
    model = load_model(sdxl_header_only, SDXL_HUB_ID)
    params = {part: sum(p.numel() for p in model.part(part).parameters()) for part in ("unet", "te1", "te2")}
    assert [round(params[p] / 1e9, 3) for p in ("unet", "te1", "te2")] == [2.567, 0.123, 0.695]
    assert model.text_encoder_2.config.hidden_size == 1280 and model.unet.config.cross_attention_dim == 2048
