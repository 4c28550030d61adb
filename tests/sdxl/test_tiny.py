"""The tiny SDXL model: deterministic build, SDXL-shaped conditioning, tokenizers, and a loadable pipeline folder."""

import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from xlbake.data.demo import CAPTION_WORDS
from xlbake.errors import OutputError
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.configs import sdxl_config
from xlbake.sdxl.tiny import (
    COMMON_WORDS,
    DEFAULT_WORDS,
    MAX_TOKENS,
    TINY_UNET,
    TINY_VAE,
    build_tiny_components,
    learn_bpe_merges,
    save_tiny,
    save_tiny_diffusers,
)

MODELS = ("unet", "text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)


def _encode(components: dict, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: penultimate hidden states of both encoders, concatenated; pooled from TE2."""
    states = []
    with torch.no_grad():
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer = components[tok_name]
            ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
            out = components[enc_name](ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out.text_embeds


def test_same_seed_same_tensors_other_seed_other_tensors(tiny):
    rng_before = torch.get_rng_state()
    again = build_tiny_components(seed=0)
    other = build_tiny_components(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not move the caller's RNG"
    for name in MODELS:
        ours, same, different = (c[name].state_dict() for c in (tiny, again, other))
        assert all(torch.equal(ours[k], same[k]) for k in ours), name
        assert any(not torch.equal(ours[k], different[k]) for k in ours), name


def test_every_weight_matrix_and_kernel_is_nonzero(tiny):
    for name in MODELS:
        for key, param in tiny[name].named_parameters():
            if param.dim() >= 2:
                assert param.abs().max() > 0, f"{name}.{key} is all zero"


def _differing(config, sdxl: dict) -> set[str]:
    return {k for k, v in sdxl.items() if config[k] != (list(v) if isinstance(v, tuple) else v)}


def test_config_is_sdxl_with_only_sizes_changed(tiny):
    unet, te1, te2 = tiny["unet"].config, tiny["text_encoder"].config, tiny["text_encoder_2"].config
    assert _differing(unet, sdxl_config("unet")) == set(TINY_UNET)
    assert _differing(tiny["vae"].config, sdxl_config("vae")) == set(TINY_VAE)
    assert _differing(tiny["scheduler"].config, sdxl_config("scheduler")) == set()
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection and unet.layers_per_block == 2
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert min(te1.num_hidden_layers, te2.num_hidden_layers) >= 3
    assert te1.vocab_size == te2.vocab_size == len(tiny["tokenizer"]) == len(tiny["tokenizer_2"])
    assert te1.eos_token_id == tiny["tokenizer"].eos_token_id == len(tiny["tokenizer"]) - 1


def test_unet_forward_with_sdxl_conditioning(tiny):
    prompt_embeds, pooled = _encode(tiny, ["a xlbk emblem on a blue background", "a photo of a dog in the snow"])
    assert prompt_embeds.shape == (2, MAX_TOKENS, 96) and pooled.shape == (2, 32)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    with torch.no_grad():
        out = tiny["unet"](latents, 500, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert out.sample.shape == latents.shape and torch.isfinite(out.sample).all()
    assert not torch.allclose(out.sample[0], out.sample[1]), "the text conditioning must reach the UNet output"


def test_bpe_merges_make_every_word_one_symbol():
    merges = learn_bpe_merges(["on", "one", "blue", "lu"])
    tokens = {"".join(pair) for pair in merges}
    assert {"on</w>", "one</w>", "blue</w>", "lu</w>"} <= tokens


def test_vocabulary_words_are_single_tokens(tiny):
    words = sorted(set(COMMON_WORDS.split()) | CAPTION_WORDS | set(DEFAULT_WORDS))
    for tokenizer in (tiny["tokenizer"], tiny["tokenizer_2"]):
        split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
        assert not split, f"words not in the vocabulary as one token: {split}"


def test_demo_captions_round_trip_and_pad_like_sdxl(tiny, demo_dataset):
    captions = [p.read_text().strip() for p in sorted(demo_dataset.glob("*/*.txt"))]
    tok1, tok2 = tiny["tokenizer"], tiny["tokenizer_2"]
    for caption in captions:
        ids = tok1(caption, padding="max_length", max_length=MAX_TOKENS).input_ids
        ids2 = tok2(caption, padding="max_length", max_length=MAX_TOKENS).input_ids
        n_words = len(re.findall(r"[a-z]+|,", caption))
        assert ids[0] == tok1.bos_token_id and ids[n_words + 1] == tok1.eos_token_id, caption
        assert ids[n_words + 2 :] == [tok1.eos_token_id] * (MAX_TOKENS - n_words - 2)
        assert ids2[: n_words + 2] == ids[: n_words + 2] and set(ids2[n_words + 2 :]) == {
            tok2.convert_tokens_to_ids("!")
        }
        assert tok1.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption


def test_any_text_tokenizes_without_unknown_tokens(tiny):
    text = "Zürich café 😀 at 12:30, über-weird qwxz words!"
    tokenizer = tiny["tokenizer"]
    ids = tokenizer(text).input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_saved_folder_holds_the_seeded_weights_and_refuses_overwrite(tiny, tiny_paths):
    saved = load_file(tiny_paths.diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in tiny["unet"].state_dict().items())
    with pytest.raises(OutputError, match="exists"):
        save_tiny(tiny_paths.diffusers_dir.parent)
    with pytest.raises(OutputError, match="exists"):
        save_tiny_diffusers(tiny_paths.diffusers_dir)


def test_force_replaces_an_existing_folder(tmp_path):
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    save_tiny_diffusers(folder, seed=1, force=True)
    assert not (folder / "stale.txt").exists() and (folder / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["diffusers"], "no staging folder may be left behind"


def test_pipeline_loads_offline_and_generates(tiny_paths):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_paths.diffusers_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a xlbk emblem on a blue background",
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_single_file_is_sgm_with_sdxl_block_indices_and_nonzero_lora_targets(tiny, tiny_paths):
    sgm = load_file(tiny_paths.single_file)
    with safe_open(tiny_paths.single_file, "pt") as handle:
        assert handle.metadata()["modelspec.resolution"] == "64x64"
    assert {k.split(".")[0] for k in sgm} == {"model", "conditioner", "first_stage_model"}
    to_q = tiny["unet"].down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(sgm["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"], to_q)
    targets = kohya_targets({k: tuple(t.shape) for k, t in sgm.items()}, conv=True)
    assert {t.component for t in targets} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in {t.name for t in targets}
    for target in targets:
        weight = sgm[target.key] if target.rows is None else sgm[target.key][slice(*target.rows)]
        assert weight.std() > 0, target.name
