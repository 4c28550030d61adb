"""Prompt tokenization in 75-token windows and SDXL's two-encoder prompt embedding, as kohya/A1111 do for captions
longer than one CLIP window. Shapes: ``B`` batch, ``C`` windows (max_token_length / 75), ``d1``/``d2`` the
hidden sizes of text encoder 1/2, ``P`` the projection size of text encoder 2."""

from __future__ import annotations

import torch
from torch import Tensor

from finetune.captions import CHUNK_TOKENS

WINDOW = CHUNK_TOKENS + 2
"""Tokens per CLIP window: begin token, 75 text tokens, end token (then padding)."""


def tokenize_chunks(tokenizer, text: str, max_token_length: int = CHUNK_TOKENS) -> Tensor:
    """Token ids (C, 77) long of ``text`` cut to ``max_token_length`` tokens, in C = max_token_length / 75 windows.

    Each window is [BOS] + up to 75 text tokens + [EOS] + padding with the tokenizer's pad token (SDXL's
    tokenizer 1 pads with EOS, tokenizer 2 with "!" = id 0); windows past the text are [BOS, EOS, pad...].
    This is what kohya's ``get_input_ids`` produces for SDXL.
    """
    if max_token_length <= 0 or max_token_length % CHUNK_TOKENS:
        raise ValueError(f"max_token_length must be a positive multiple of 75, got {max_token_length}")
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_token_length).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for start in range(0, max_token_length, CHUNK_TOKENS):
        part = list(ids[start : start + CHUNK_TOKENS])
        rows.append([bos, *part, eos] + [pad] * (CHUNK_TOKENS - len(part)))
    return torch.tensor(rows, dtype=torch.long)


def encode_prompt(text_encoder, text_encoder_2, ids_1: Tensor, ids_2: Tensor) -> tuple[Tensor, Tensor]:
    """SDXL prompt embeddings from both encoders, with gradients if the encoders require them.

    Args:
        text_encoder: CLIPTextModel (SDXL's CLIP ViT-L).
        text_encoder_2: CLIPTextModelWithProjection (SDXL's OpenCLIP bigG).
        ids_1, ids_2: (B, C, 77) token ids from ``tokenize_chunks`` with each encoder's tokenizer.

    Returns:
        prompt_embeds (B, C*77, d1+d2): the penultimate hidden state of each encoder (hidden_states[-2], as SDXL
        conditions on), concatenated on the feature axis, windows concatenated on the sequence axis;
        pooled_prompt_embeds (B, P): text encoder 2's projected output (text_embeds) of the FIRST window.
    """
    if ids_1.shape != ids_2.shape or ids_1.ndim != 3:
        raise ValueError(f"ids_1 and ids_2 must both be (B, C, 77), got {tuple(ids_1.shape)}, {tuple(ids_2.shape)}")
    batch, chunks, width = ids_1.shape
    out_1 = text_encoder(ids_1.reshape(-1, width).to(_device(text_encoder)), output_hidden_states=True)
    out_2 = text_encoder_2(ids_2.reshape(-1, width).to(_device(text_encoder_2)), output_hidden_states=True)
    hidden_1 = out_1.hidden_states[-2]
    hidden_2 = out_2.hidden_states[-2].to(device=hidden_1.device, dtype=hidden_1.dtype)
    prompt_embeds = torch.cat([hidden_1, hidden_2], dim=-1).reshape(batch, chunks * width, -1)
    pooled = out_2.text_embeds.reshape(batch, chunks, -1)[:, 0]
    return prompt_embeds, pooled


def _device(module: torch.nn.Module) -> torch.device:
    """The device of a module's weights (also for DDP/compiled wrappers, which have no ``.device``)."""
    return next(module.parameters()).device
