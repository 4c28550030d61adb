"""The tiny SDXL-architecture model: built in code, offline and deterministically, for tests and ``make demo``.

Same architecture as SDXL base 1.0 at toy sizes: a UNet with ``addition_embed_type="text_time"``, two layers per
block and linear transformer projections (so original-checkpoint block indices come out as in SDXL), two CLIP text
encoders (TE1 like CLIP ViT-L with quick_gelu, TE2 like OpenCLIP bigG with gelu and a text projection), byte-level
BPE tokenizers over a small made-up vocabulary, a 2-block VAE and SDXL's scheduler config. Weights are random from
the seed; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from xlbake.data.demo import CAPTION_WORDS
from xlbake.errors import OutputError
from xlbake.fileio import TEMP_PREFIX
from xlbake.sdxl.checkpoint import convert_diffusers_folder
from xlbake.sdxl.configs import build_components, sdxl_config

DIFFUSERS_SUBDIR = "diffusers"
SINGLE_FILE_NAME = "tiny-sdxl.safetensors"
SINGLE_FILE_METADATA = {
    "modelspec.title": "tiny-sdxl",
    "modelspec.description": "tiny random-weight SDXL-architecture model built by xlbake (for tests and demos)",
    "modelspec.resolution": "64x64",
}
MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TE2_PAD = "!"
"""SDXL's tokenizer_2 pads with "!" (id 0) instead of the end token."""

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 32, 64, 32
TEXT_LAYERS = 3
"""At least 3, since SDXL conditions on the penultimate hidden state of each encoder."""
ADDITION_TIME_EMBED_DIM = 8
N_TIME_IDS = 6
"""original size (2), crop top-left (2), target size (2)."""

TINY_UNET: dict[str, Any] = {
    "sample_size": 32,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),  # like SDXL's (5, 10, 20): diffusers reads it as the number of heads
    "cross_attention_dim": TE1_HIDDEN + TE2_HIDDEN,
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": N_TIME_IDS * ADDITION_TIME_EMBED_DIM + TE2_PROJECTION,
}
"""What the tiny UNet changes in SDXL's UNet config: sizes only (two blocks at toy widths)."""
TINY_VAE: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "sample_size": 64,
}
"""What the tiny VAE changes in SDXL's VAE config: two blocks, so latents are half the image size."""

COMMON_WORDS = """
a an the of on in at with and or to by for from near under over inside outside behind front back
photo picture image painting drawing illustration render sketch portrait close up view shot scene art artwork style
digital simple flat detailed beautiful high quality cinematic colorful bright dark light soft sharp blurry
red orange yellow green blue purple pink brown gray grey black white gold silver teal cyan magenta navy olive
small large big tiny little tall short round square circle star ring dot line shape pattern logo icon symbol
sign badge emblem glyph mark texture striped checkered gradient plain noisy
man woman person people child girl boy dog cat bird horse face hair eyes hand
tree flower grass forest mountain river lake sea ocean beach sky cloud clouds sun moon night day water snow
house building city street road car room wall floor table chair window door
sitting standing walking running holding wearing looking smiling
top bottom left right center middle corner edge side background foreground
"""
"""Whole words in the tiny vocabulary besides the demo captions' words; other text falls back to pieces."""
HUB_CACHE_COMMIT = "0" * 40
"""The made-up commit of the tiny tokenizers laid out as a hub cache."""
DEFAULT_WORDS = ("xlbk", "emblem")
"""The demo dataset's default trigger and class word."""


@dataclass(frozen=True)
class TinyPaths:
    """Where ``save_tiny`` wrote the model."""

    diffusers_dir: Path
    single_file: Path


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """Build the tiny SDXL pipeline components with weights drawn from ``seed``; the caller's RNG is untouched.

    Returns the ``StableDiffusionXLPipeline`` keyword arguments: ``unet``, ``text_encoder``, ``text_encoder_2``,
    ``tokenizer``, ``tokenizer_2``, ``vae``, ``scheduler``. Every module is in fp32 eval mode on the CPU.
    """
    tokenizer, tokenizer_2 = build_tokenizers()
    configs = tiny_configs(tokenizer, tokenizer_2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = build_components(configs, meta=False)
    return {
        **{name: model.eval() for name, model in models.items()},
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": EulerDiscreteScheduler(**configs["scheduler"]),
    }


def tiny_configs(tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer) -> dict[str, dict[str, Any]]:
    """Constructor kwargs of the tiny unet, text_encoder, text_encoder_2, vae and scheduler.

    Each is SDXL's own config (:mod:`xlbake.sdxl.configs`) with only sizes and token ids changed, so every choice
    that shapes key names (layers per block, linear projections, text_time embedding, ...) is SDXL's.
    """
    return {
        "unet": {**sdxl_config("unet"), **TINY_UNET},
        "text_encoder": _text_config("text_encoder", tokenizer, TE1_HIDDEN, TE1_HIDDEN),
        "text_encoder_2": _text_config("text_encoder_2", tokenizer_2, TE2_HIDDEN, TE2_PROJECTION),
        "vae": {**sdxl_config("vae"), **TINY_VAE},
        "scheduler": sdxl_config("scheduler"),
    }


def build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The two SDXL tokenizers over the tiny vocabulary: the same BPE, tokenizer_2 padding with "!"."""
    vocab, merges = tiny_vocabulary()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS)
    tokenizer_2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=TE2_PAD, model_max_length=MAX_TOKENS)
    return tokenizer, tokenizer_2


def tiny_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab and merges: 256 byte symbols, their end-of-word forms, merged whole words, then BOS/EOS.

    Words are ASCII lower case, whose byte-level symbols are the letters themselves. Any other text still
    tokenizes, into smaller pieces down to single bytes.
    """
    symbols = list(_bytes_to_unicode().values())
    words = sorted(set(COMMON_WORDS.split()) | CAPTION_WORDS | set(DEFAULT_WORDS))
    merges = learn_bpe_merges(words)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE training (most frequent pair first, ties by text) until every word is one symbol.

    Each word starts as its letters with "</w>" on the last one, as CLIP's tokenizer splits it.
    """
    pieces = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for word in pieces for pair in zip(word, word[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        pieces = [_merge(word, best) for word in pieces]


def save_tiny(out_dir: str | Path, seed: int = 0, force: bool = False) -> TinyPaths:
    """Write the tiny model as ``out_dir/diffusers`` (pipeline folder) and ``out_dir/tiny-sdxl.safetensors`` (SGM).

    Refuses existing outputs unless ``force``. Takes a few seconds on a CPU.
    """
    out_dir = Path(out_dir)
    single_file = out_dir / SINGLE_FILE_NAME
    if single_file.exists() and not force:
        raise OutputError(f"{single_file}: output exists; pass --force to overwrite it or choose another folder")
    diffusers_dir = save_tiny_diffusers(out_dir / DIFFUSERS_SUBDIR, seed=seed, force=force)
    convert_diffusers_folder(diffusers_dir, single_file, force=force, metadata=SINGLE_FILE_METADATA)
    return TinyPaths(diffusers_dir=diffusers_dir, single_file=single_file)


def save_tiny_diffusers(folder: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Save the tiny model as a ``StableDiffusionXLPipeline`` folder (safetensors), replacing it only with ``force``.

    The folder is written beside its final name and renamed into place, so it is never left half written.
    """
    folder = Path(folder)
    if folder.exists() and not force:
        raise OutputError(f"{folder}: output exists; pass --force to overwrite it or choose another folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder.parent))
    except OSError as exc:
        raise OutputError(f"{folder.parent}: cannot write ({exc.strerror}); choose a writable folder") from exc
    try:
        pipe = StableDiffusionXLPipeline(**build_tiny_components(seed), add_watermarker=False)
        pipe.save_pretrained(staging, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror}); free space or choose another folder") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_tokenizers_as_hub_cache(cache_dir: str | Path, repo: str) -> Path:
    """Lay the tiny tokenizers out as ``repo``'s ``tokenizer/`` and ``tokenizer_2/`` in a Hugging Face hub cache
    (``cache_dir`` as HF_HUB_CACHE), so that offline checks read them through the real hub-cache lookup.

    Returns the snapshot folder. The commit hash is made up; ``refs/main`` points at it as a download would.
    """
    storage = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / HUB_CACHE_COMMIT
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), build_tokenizers(), strict=True):
        tokenizer.save_pretrained(snapshot / name)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(HUB_CACHE_COMMIT)
    return snapshot


def _text_config(name: str, tokenizer: CLIPTokenizer, hidden: int, projection_dim: int) -> dict[str, Any]:
    """SDXL's text encoder config at toy size, with the tiny tokenizer's vocabulary size and token ids."""
    return {
        **sdxl_config(name),
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "projection_dim": projection_dim,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}
