"""Training samples: each prompt line's kohya options (--w --h --s --l --d --n) override the sample.* defaults."""

import pytest
from PIL import Image

from finetune.config import FinetuneConfig, SampleConfig
from finetune.sampling import render_samples
from xlbake.config import load_config
from xlbake.errors import ConfigError
from xlbake.tiny import build_tiny_components


@pytest.fixture(scope="module")
def parts():
    return build_tiny_components()


def test_prompt_options_set_each_sample_size_and_the_default_the_rest(parts, tmp_path):
    cfg = SampleConfig(prompts=("xlbk emblem --w 16 --h 24 --s 1 --d 3", "xlbk emblem --s 1"), width=32, height=40)
    written = render_samples(parts, cfg, tmp_path, "final")
    assert [p.name for p in written] == ["final-00.png", "final-01.png"]
    assert [Image.open(p).size for p in written] == [(16, 24), (32, 40)]


def test_seed_option_gives_the_same_image_as_that_default_seed(parts, tmp_path):
    size = {"width": 16, "height": 16}
    by_option = render_samples(parts, SampleConfig(prompts=("xlbk --s 1 --d 5",), **size), tmp_path, "a")
    by_default = render_samples(parts, SampleConfig(prompts=("xlbk --s 1",), seed=5, **size), tmp_path, "b")
    assert by_option[0].read_bytes() == by_default[0].read_bytes()


def test_a_bad_prompt_option_is_a_config_error_naming_the_prompt():
    with pytest.raises(ConfigError, match=r"sample.prompts\[1\]: 'dog --x 2': unknown option --x"):
        load_config(FinetuneConfig, data={"sample": {"prompts": ["cat --w 64", "dog --x 2"]}})
