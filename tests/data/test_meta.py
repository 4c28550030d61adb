"""The dataset keys kohya writes into every LoRA (what A1111's metadata view and CivitAI show)."""

import json

from xlbake.data.meta import DATASET_DIRS, TAG_FREQUENCY, TRIGGER_PHRASE, dataset_keys, dataset_metadata


def test_tags_are_counted_per_folder_as_kohya_counts_them():
    images = [
        ("2_xlbk emblem", 2, "xlbk emblem, Red, , blue background"),
        ("2_xlbk emblem", 2, "xlbk emblem, red"),
        ("1_style", 1, "a painting of a house in the rain"),  # natural language: one segment
    ]
    meta = dataset_metadata(images, triggers=("xlbk", "emblem"))
    assert json.loads(meta[TAG_FREQUENCY]) == {
        "2_xlbk emblem": {"xlbk emblem": 2, "red": 2, "blue background": 1},
        "1_style": {"a painting of a house in the rain": 1},
    }
    assert json.loads(meta[DATASET_DIRS]) == {
        "2_xlbk emblem": {"n_repeats": 2, "img_count": 2},
        "1_style": {"n_repeats": 1, "img_count": 1},
    }
    assert meta[TRIGGER_PHRASE] == "xlbk, emblem"


def test_no_triggers_no_trigger_phrase():
    assert TRIGGER_PHRASE not in dataset_metadata([("1_a", 1, "a")], triggers=())


def test_dataset_keys_take_only_those_keys_and_drop_broken_json():
    source = {TAG_FREQUENCY: '{"1_a": {"a": 1}}', DATASET_DIRS: "{broken", TRIGGER_PHRASE: "xlbk", "ss_other": "1"}
    assert dataset_keys(source) == {TAG_FREQUENCY: '{"1_a": {"a": 1}}', TRIGGER_PHRASE: "xlbk"}
