"""A run's images: the deterministic calibration / held-out split and the dataset settings read from a run."""

import random
from pathlib import Path

import pytest
import yaml

from xlbake.data.kohya import Item
from xlbake.data.run_images import dataset_source, read_run, run_items, split_items
from xlbake.errors import InputError


def _items(names):
    return [Item(Path("/data") / folder / name, f"caption {name}") for folder, name in names]


def test_split_halves_each_concept_folder_whatever_the_order():
    names = [("2_a", f"{i:03d}.png") for i in range(9)] + [("1_b", f"{i:03d}.png") for i in range(4)]
    items = _items(names)
    calibration, held = split_items(items, "calibration"), split_items(items, "heldout")
    assert set(calibration).isdisjoint(held) and set(calibration) | set(held) == set(items)
    assert [len([i for i in calibration if i.image.parent.name == f]) for f in ("2_a", "1_b")] == [5, 2]
    assert calibration == [i for i in items if i in calibration]  # the input order is kept
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    assert set(split_items(shuffled, "calibration")) == set(calibration)  # not the file-system order
    moved = [Item(Path("/elsewhere/run/builtin") / i.image.parent.name / i.image.name, i.caption) for i in items]
    assert {i.image.name for i in split_items(moved, "heldout")} == {i.image.name for i in held}
    assert split_items(items, "all") == items
    assert calibration != items[:7]  # mixed by the hash, not the first files


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="heldout"):
        split_items([], "test")


def test_a_run_folder_or_a_dataset_root_is_read_and_anything_else_refused(demo_dataset, tmp_path):
    root = dataset_source(demo_dataset, resolution=64)
    assert root.roots == (demo_dataset,) and root.resolution == 64
    assert len(run_items(root, seed=0)) == 8
    run = tmp_path / "run"
    run.mkdir()
    data = {"roots": ["builtin:demo"], "resolution": 32, "bucket_step": 8}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": data}))
    found = dataset_source(run, resolution=64)
    assert found == read_run(run) and found.roots == (run / "builtin" / "demo",) and found.resolution == 32
    with pytest.raises(InputError, match="neither a finetune run folder"):
        dataset_source(tmp_path / "missing", resolution=64)
