"""Caption processing: kohya's keep/shuffle/tag dropout/caption dropout, deterministic per generator."""

import random

import pytest

from finetune.captions import CaptionConfig, process_caption
from xlbake.errors import ConfigError

CAPTION = "xlbk emblem, red background, striped, small"


def run(caption: str, seed: int = 0, epoch: int = 0, **options) -> str:
    return process_caption(caption, CaptionConfig(**options), epoch, random.Random(seed))


def test_defaults_keep_the_first_line_only():
    assert run(CAPTION + "\nsecond line\n") == CAPTION
    assert run("  spaced  ") == "spaced"


def test_shuffle_keeps_the_first_tokens_in_place():
    outputs = {run(CAPTION, seed=s, shuffle=True, keep_tokens=1) for s in range(40)}
    tags = ["red background", "striped", "small"]
    for out in outputs:
        first, *rest = out.split(", ")
        assert first == "xlbk emblem" and sorted(rest) == sorted(tags)
    assert len(outputs) == 6  # every order of the three other tags shows up
    assert run(CAPTION, seed=7, shuffle=True) == run(CAPTION, seed=7, shuffle=True)


def test_tag_dropout_only_drops_unkept_tags():
    assert run(CAPTION, tag_dropout_rate=1.0, keep_tokens=2) == "xlbk emblem, red background"
    kept = [run(CAPTION, seed=s, tag_dropout_rate=0.5).count(",") + 1 for s in range(200)]
    assert 1.5 < sum(kept) / len(kept) < 2.5  # half of the four tags on average


def test_caption_dropout_rate_and_every_n_epochs():
    assert run(CAPTION, dropout_rate=1.0) == ""
    dropped = sum(run(CAPTION, seed=s, dropout_rate=0.25) == "" for s in range(400))
    assert 60 < dropped < 140
    # kohya counts epochs from 1: every 3rd epoch is epoch index 2, 5, 8...
    assert [run(CAPTION, epoch=e, dropout_every_n_epochs=3) == "" for e in range(6)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]


def test_prefix_and_suffix_stay_at_the_ends():
    for seed in range(10):
        out = run("a, b, c", seed=seed, shuffle=True, prefix="photo of", suffix="best quality")
        assert out.startswith("photo of ") and out.endswith(" best quality")
    assert run("", prefix="p") == "p"


def test_separator_and_empty_tags():
    out = run("a; b;; c", seed=1, shuffle=True, separator=";")
    assert sorted(out.split("; ")) == ["a", "b", "c"]
    assert run("a,, b", shuffle=True, keep_tokens=2) == "a, b"


def test_config_checks():
    with pytest.raises(ConfigError, match="dropout_rate"):
        CaptionConfig(dropout_rate=1.5)
    with pytest.raises(ConfigError, match="keep_tokens"):
        CaptionConfig(keep_tokens=-1)
    with pytest.raises(ConfigError, match="max_token_length"):
        CaptionConfig(max_token_length=100)
