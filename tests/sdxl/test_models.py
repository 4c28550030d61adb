"""Architecture of a checkpoint: single files recognised by their shapes, SDXL's tokenizers from the hub cache."""

from __future__ import annotations

import huggingface_hub.constants
import pytest

from benchmarks.real_check import checkpoint_layout, write_random_checkpoint
from xlbake.errors import InputError
from xlbake.sdxl import models as architecture
from xlbake.sdxl.configs import SDXL_TE2_CONFIG, SDXL_UNET_CONFIG
from xlbake.sdxl.models import SDXL_HUB_ID, TOKENIZER_FILES, resolve_architecture, single_file_kind
from xlbake.sdxl.tiny import build_tokenizers, save_tokenizers_as_hub_cache


def test_layout_is_sdxl_base_files():
    assert len(checkpoint_layout()) == 2515


def test_single_files_recognised_by_shape(tiny_paths, sdxl_header_only):
    assert single_file_kind(tiny_paths.single_file) == "tiny"
    assert single_file_kind(sdxl_header_only) == "sdxl"


def test_other_sizes_refused_naming_the_first_difference(tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sdxl_layout = checkpoint_layout()
    layout = {**sdxl_layout, key: ((256, 4, 3, 3), sdxl_layout[key][1])}
    path = write_random_checkpoint(tmp_path / "other.safetensors", layout, fill=False)
    with pytest.raises(InputError, match=rf"{key} is \[256, 4, 3, 3\], not \[320, 4, 3, 3\].*model\.components"):
        single_file_kind(path)


def test_real_sdxl_tokenizers_fetched_into_the_cache_on_first_use(tmp_path, monkeypatch, sdxl_header_only):
    calls = []

    def fake_download(repo_id, *, allow_patterns, local_files_only):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(save_tokenizers_as_hub_cache(tmp_path / "hub", repo_id))

    monkeypatch.setattr(architecture, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    arch = resolve_architecture(sdxl_header_only)
    assert calls == [(SDXL_HUB_ID, TOKENIZER_FILES, False)]
    assert arch.unet == SDXL_UNET_CONFIG
    assert arch.text_encoder_2.hidden_size == SDXL_TE2_CONFIG["hidden_size"]
    assert arch.tokenizer.get_vocab() == build_tokenizers()[0].get_vocab()


def test_real_sdxl_tokenizers_read_offline_from_the_hub_cache(hub_cache, sdxl_header_only):
    save_tokenizers_as_hub_cache(hub_cache, SDXL_HUB_ID)
    arch = resolve_architecture(sdxl_header_only)
    assert arch.tokenizer_2.get_vocab() == build_tokenizers()[1].get_vocab()


def test_offline_with_nothing_cached_says_what_to_download(hub_cache, sdxl_header_only):
    with pytest.raises(InputError) as info:
        resolve_architecture(sdxl_header_only)
    message = str(info.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message
    assert f"hf download {SDXL_HUB_ID} --include 'tokenizer/*' 'tokenizer_2/*'" in message
    assert "model.components" in message


def test_components_folder_wins(tiny_paths, sdxl_header_only):
    assert resolve_architecture(sdxl_header_only, tiny_paths.diffusers_dir).source == str(tiny_paths.diffusers_dir)
