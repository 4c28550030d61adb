"""75-token windows and SDXL's two-encoder prompt embedding, on the tiny model's real CLIP tokenizers/encoders."""

import pytest
import torch

from finetune.text import encode_prompt, tokenize_chunks


@pytest.fixture(scope="module")
def tiny():
    from xlbake.sdxl.tiny import build_tiny_components

    return build_tiny_components()


def words(n: int) -> str:
    """n one-token words of the tiny vocabulary."""
    vocabulary = ["red", "blue", "green", "small", "large", "emblem"]
    return " ".join(vocabulary[i % len(vocabulary)] for i in range(n))


def test_one_window_matches_the_tokenizers_own_padding(tiny):
    for tokenizer in (tiny["tokenizer"], tiny["tokenizer_2"]):
        text = "a small xlbk emblem on a red striped background"
        ids = tokenize_chunks(tokenizer, text, 75)
        reference = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert ids.dtype == torch.long and ids.shape == (1, 77)
        assert torch.equal(ids, reference.input_ids)


def test_padding_token_per_tokenizer(tiny):
    t1, t2 = tiny["tokenizer"], tiny["tokenizer_2"]
    empty_1, empty_2 = tokenize_chunks(t1, "", 75)[0], tokenize_chunks(t2, "", 75)[0]
    assert empty_1[:2].tolist() == [t1.bos_token_id, t1.eos_token_id]
    assert (empty_1[2:] == t1.eos_token_id).all()  # tokenizer 1 pads with the end token
    assert empty_2[:2].tolist() == [t2.bos_token_id, t2.eos_token_id]
    assert (empty_2[2:] == 0).all() and t2.convert_ids_to_tokens(0) == "!"  # tokenizer 2 pads with "!"


def test_long_captions_split_into_wrapped_windows(tiny):
    tokenizer = tiny["tokenizer_2"]
    text = words(100)
    plain = tokenizer(text, add_special_tokens=False).input_ids
    assert len(plain) == 100
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenize_chunks(tokenizer, text, 225)
    assert ids.shape == (3, 77)
    assert ids[0].tolist() == [bos, *plain[:75], eos]
    assert ids[1].tolist() == [bos, *plain[75:], eos] + [0] * 50
    assert ids[2].tolist() == [bos, eos] + [0] * 75
    cut = tokenize_chunks(tokenizer, text, 75)
    assert cut.tolist() == [[bos, *plain[:75], eos]]
    with pytest.raises(ValueError, match="multiple of 75"):
        tokenize_chunks(tokenizer, text, 100)


def test_encode_prompt_shapes_penultimate_layers_and_first_window_pool(tiny):
    te1, te2 = tiny["text_encoder"], tiny["text_encoder_2"]
    texts = ["xlbk emblem", words(90)]
    ids_1 = torch.stack([tokenize_chunks(tiny["tokenizer"], t, 150) for t in texts])
    ids_2 = torch.stack([tokenize_chunks(tiny["tokenizer_2"], t, 150) for t in texts])
    embeds, pooled = encode_prompt(te1, te2, ids_1, ids_2)
    d1, d2 = te1.config.hidden_size, te2.config.hidden_size
    assert embeds.shape == (2, 154, d1 + d2) and pooled.shape == (2, te2.config.projection_dim)
    with torch.no_grad():
        second_window_1 = te1(ids_1[1, 1:], output_hidden_states=True).hidden_states[-2][0]
        second_window_2 = te2(ids_2[1, 1:], output_hidden_states=True).hidden_states[-2][0]
        first_window_pool = te2(ids_2[:, 0]).text_embeds
    assert torch.allclose(embeds[1, 77:, :d1], second_window_1, atol=1e-5)
    assert torch.allclose(embeds[1, 77:, d1:], second_window_2, atol=1e-5)
    assert torch.allclose(pooled, first_window_pool, atol=1e-5)


def test_windows_are_encoded_independently(tiny):
    te1, te2 = tiny["text_encoder"], tiny["text_encoder_2"]
    a, b = words(80), words(75) + " emblem emblem emblem emblem emblem"
    ids_1 = torch.stack([tokenize_chunks(tiny["tokenizer"], t, 150) for t in (a, b)])
    ids_2 = torch.stack([tokenize_chunks(tiny["tokenizer_2"], t, 150) for t in (a, b)])
    with torch.no_grad():
        embeds, pooled = encode_prompt(te1, te2, ids_1, ids_2)
    assert torch.allclose(embeds[0, :77], embeds[1, :77], atol=1e-6)  # same first 75 tokens
    assert not torch.allclose(embeds[0, 77:], embeds[1, 77:])
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6)


def test_gradients_reach_both_encoders(tiny):
    te1, te2 = tiny["text_encoder"], tiny["text_encoder_2"]
    te1.zero_grad(), te2.zero_grad()
    ids_1 = tokenize_chunks(tiny["tokenizer"], "xlbk emblem", 75)[None]
    ids_2 = tokenize_chunks(tiny["tokenizer_2"], "xlbk emblem", 75)[None]
    embeds, pooled = encode_prompt(te1, te2, ids_1, ids_2)
    (embeds.square().mean() + pooled.square().mean()).backward()
    assert te1.get_input_embeddings().weight.grad.abs().sum() > 0
    assert te2.text_projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="B, C, 77"):
        encode_prompt(te1, te2, ids_1, ids_2[:, :, :10])
