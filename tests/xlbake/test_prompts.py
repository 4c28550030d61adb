"""Per-prompt sample options in kohya's prompt-line syntax (``prompt --n negative --w 832 --d 5``)."""

import pytest

from xlbake.errors import InputError
from xlbake.prompts import PromptDefaults, SampleOptions, parse_prompt_line, prompt_text


def test_a_plain_prompt_has_no_options():
    assert parse_prompt_line("xlbk emblem, red") == SampleOptions("xlbk emblem, red")


def test_every_kohya_option_is_read():
    line = "a photo of kafka --n lowres, blurry --w 832 --h 1216 --s 28 --l 6.5 --d 42"
    assert parse_prompt_line(line) == SampleOptions(
        "a photo of kafka", negative_prompt="lowres, blurry", width=832, height=1216, steps=28, guidance_scale=6.5,
        seed=42,
    )


def test_options_are_case_insensitive_and_the_last_one_wins_as_in_kohya():
    assert parse_prompt_line("cat --W 512 --w 640 --N dog") == SampleOptions("cat", negative_prompt="dog", width=640)


def test_only_space_dash_dash_starts_an_option():
    assert parse_prompt_line("a--b, c --w 64").prompt == "a--b, c"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cat --x 5", "--x"),
        ("cat --ss euler_a", "--ss"),
        ("cat --w wide", "--w"),
        ("cat --w 513", "multiple of 8"),
        ("cat --s 0", "--s"),
        ("cat --l", "--l"),
        ("cat --d -1", "--d"),
        (" --w 64", "empty prompt"),
    ],
)
def test_bad_options_name_the_prompt_and_the_option(line, expected):
    with pytest.raises(InputError) as err:
        parse_prompt_line(line)
    assert expected in str(err.value) and repr(line.strip()) in str(err.value)


def test_defaults_fill_what_a_line_leaves_out_and_seeds_follow_the_index():
    defaults = PromptDefaults(negative_prompt="ugly", width=64, height=32, steps=3, guidance_scale=5.0, seed=10)
    plain, custom = (parse_prompt_line(line) for line in ["cat", "dog --h 48 --d 7 --n"])
    assert plain.resolve(defaults, index=1) == SampleOptions("cat", "ugly", 64, 32, 3, 5.0, 11)
    assert custom.resolve(defaults, index=1) == SampleOptions("dog", "", 64, 48, 3, 5.0, 7)  # bare --n: none


def test_errors_name_where_the_line_is():
    with pytest.raises(InputError, match=r"^prompts.txt:2: 'dog --q 1': unknown option --q"):
        parse_prompt_line("dog --q 1", where="prompts.txt:2")


def test_prompt_text_drops_the_options():
    assert prompt_text("a cat --n dog --w 64") == "a cat"
