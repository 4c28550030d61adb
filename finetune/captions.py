"""Caption augmentation with kohya sd-scripts semantics: keep the first N tags, shuffle the rest, tag dropout and
caption dropout. Pure: the randomness comes from the caller's ``random.Random`` (seeded per sample and epoch)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from xlbake.errors import ConfigError

CHUNK_TOKENS = 75
"""Text tokens per 77-token CLIP window (the other two are the begin and end tokens)."""


@dataclass(frozen=True)
class CaptionConfig:
    """How captions are processed before tokenization (a kohya dataset TOML may override these per subset)."""

    shuffle: bool = False
    """Shuffle the caption's tags (split at `separator`) every time an image is drawn, after the kept ones."""
    keep_tokens: int = 0
    """Number of leading tags that stay first and in order (never shuffled or dropped), e.g. the trigger word."""
    separator: str = ","
    """Tag separator for shuffle, keep_tokens and tag dropout; processed tags are joined with it plus a space."""
    dropout_rate: float = 0.0
    """Probability that an image is trained with an empty caption (drawn anew each epoch)."""
    dropout_every_n_epochs: int = 0
    """Train every image with an empty caption in every N-th epoch (the N-th, 2N-th, ... counting from 1); 0 = off."""
    tag_dropout_rate: float = 0.0
    """Probability of dropping each tag after the kept ones (drawn anew each epoch)."""
    max_token_length: Literal[75, 150, 225] = 75
    """Caption tokens seen by the text encoders: 75 (one window), 150 or 225 (two or three 75-token windows, each
    encoded separately and concatenated, as SDXL UIs do); longer captions are cut."""
    prefix: str = ""
    """Text put before every caption (kept first, never shuffled or dropped except by caption dropout)."""
    suffix: str = ""
    """Text put after every caption (kept last, never shuffled or dropped except by caption dropout)."""

    def __post_init__(self) -> None:
        errors = []
        for key in ("dropout_rate", "tag_dropout_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                errors.append(f"caption.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.keep_tokens < 0 or self.dropout_every_n_epochs < 0:
            errors.append("caption.keep_tokens and caption.dropout_every_n_epochs must be >= 0")
        if not self.separator:
            errors.append("caption.separator must not be empty")
        if self.max_token_length % CHUNK_TOKENS:
            errors.append(f"caption.max_token_length must be 75, 150 or 225, got {self.max_token_length}")
        if errors:
            raise ConfigError("; ".join(errors))


def process_caption(caption: str, cfg: CaptionConfig, epoch: int, rng: random.Random) -> str:
    """The caption one image is trained with in one epoch.

    Order as in kohya's ``process_caption``: caption dropout is decided first (rate, then every-N-epochs; a dropped
    caption is ""), only the first line is used, then the tags after the first ``keep_tokens`` are shuffled and
    each is dropped with ``tag_dropout_rate``. Differences from kohya, on purpose: empty tags are removed, and
    prefix/suffix stay at the ends instead of being glued to the first/last tag (which shuffling would move).

    Args:
        caption: the raw caption text.
        cfg: caption settings.
        epoch: 0-based epoch index (kohya counts epochs from 1: epoch 0 here is kohya's epoch 1).
        rng: source of randomness; the same rng state gives the same result.
    """
    drop = cfg.dropout_rate > 0 and rng.random() < cfg.dropout_rate
    drop = drop or (cfg.dropout_every_n_epochs > 0 and (epoch + 1) % cfg.dropout_every_n_epochs == 0)
    if drop:
        return ""
    lines = caption.strip().splitlines()
    text = lines[0].strip() if lines else ""
    joiner = cfg.separator.rstrip() + " "
    if cfg.shuffle or cfg.tag_dropout_rate > 0:
        tags = [tag.strip() for tag in text.split(cfg.separator) if tag.strip()]
        fixed, flexible = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
        if cfg.shuffle:
            rng.shuffle(flexible)
        if cfg.tag_dropout_rate > 0:
            flexible = [tag for tag in flexible if rng.random() >= cfg.tag_dropout_rate]
        text = joiner.join(fixed + flexible)
    return " ".join(part for part in (cfg.prefix.strip(), text, cfg.suffix.strip()) if part)
