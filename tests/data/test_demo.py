"""The built-in demo dataset: kohya layout, captions, varied sizes, the emblem in every image, determinism."""

import re

import numpy as np
import pytest
from PIL import Image

from xlbake.data.demo import CAPTION_WORDS, DIAMOND_RGB, DISC_RGB, MAX_SIDE, MIN_SIDE, RING_RGB, make_demo_dataset
from xlbake.errors import ConfigError, OutputError


def _pairs(folder):
    images = sorted(folder.glob("*.png"))
    return images, [p.with_suffix(".txt") for p in images]


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12, min_count: int = 4) -> bool:
    close = np.abs(pixels.astype(int) - np.asarray(rgb)).max(axis=-1) <= tolerance
    return int(close.sum()) >= min_count


def test_kohya_layout_with_image_caption_pairs(demo_dataset):
    folders = list(demo_dataset.iterdir())
    assert [p.name for p in folders] == ["2_xlbk emblem"]
    images, captions = _pairs(folders[0])
    assert [p.name for p in images] == [f"{i:03d}.png" for i in range(8)]
    assert all(p.is_file() for p in captions)
    assert sorted(p.name for p in folders[0].iterdir()) == sorted(p.name for p in images + captions)


def test_images_vary_in_size_and_aspect_and_all_show_the_emblem(demo_dataset):
    images, _ = _pairs(demo_dataset / "2_xlbk emblem")
    sizes = []
    for path in images:
        image = Image.open(path)
        assert image.mode == "RGB"
        assert min(image.size) >= MIN_SIDE and max(image.size) <= MAX_SIDE, path.name
        pixels = np.asarray(image)
        assert all(_has_colour(pixels, rgb) for rgb in (RING_RGB, DISC_RGB, DIAMOND_RGB)), path.name
        sizes.append(image.size)
    aspects = {round(w / h, 1) for w, h in sizes}
    assert len(set(sizes)) >= 6 and any(a > 1 for a in aspects) and any(a < 1 for a in aspects)


def test_captions_name_trigger_and_class_in_plain_words(demo_dataset):
    _, captions = _pairs(demo_dataset / "2_xlbk emblem")
    texts = [p.read_text(encoding="utf-8") for p in captions]
    assert len(set(texts)) > len(texts) // 2, "captions should vary"
    for text in texts:
        assert text.endswith("\n") and text.count("\n") == 1
        assert "xlbk emblem" in text and "background" in text
        words = set(re.findall(r"[a-z]+", text))
        assert words - {"xlbk", "emblem"} <= CAPTION_WORDS, text


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = make_demo_dataset(tmp_path / "a", n_images=4, seed=3)
    second = make_demo_dataset(tmp_path / "b", n_images=4, seed=3)
    other = make_demo_dataset(tmp_path / "c", n_images=4, seed=4)
    files = sorted(p.relative_to(first) for p in first.rglob("*.*"))
    assert len(files) == 8
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files if f.suffix == ".png")


def test_custom_trigger_class_and_repeats(tmp_path):
    root = make_demo_dataset(tmp_path, n_images=2, trigger="zq7", class_word="badge", repeats=5)
    assert root == tmp_path
    folder = tmp_path / "5_zq7 badge"
    _, captions = _pairs(folder)
    assert len(captions) == 2 and all("zq7 badge" in p.read_text() for p in captions)


def test_refuses_non_empty_folder_unless_forced(tmp_path):
    make_demo_dataset(tmp_path, n_images=3)
    folder = tmp_path / "2_xlbk emblem"
    (folder / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        make_demo_dataset(tmp_path, n_images=2)
    make_demo_dataset(tmp_path, n_images=2, force=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["000.png", "000.txt", "001.png", "001.txt", "notes.md"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_images": 0}, "n_images"),
        ({"repeats": 0}, "repeats"),
        ({"trigger": "two words"}, "trigger"),
        ({"class_word": "a/b"}, "class_word"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_the_style_concept_is_another_concept_in_the_same_layout(tmp_path):
    from xlbake.data.demo import STYLE_PALETTE, make_style_dataset

    root = make_style_dataset(tmp_path / "a", n_images=6)
    images, captions = _pairs(root / "2_qvst style")
    assert [p.name for p in images] == [f"{i:03d}.png" for i in range(6)]
    texts = [p.read_text().strip() for p in captions]
    assert all("qvst style" in text and re.search(r"\b(sun|tree|house|star)\b", text) for text in texts)
    assert not any("emblem" in text or "xlbk" in text for text in texts)
    for path in images:
        pixels = np.asarray(Image.open(path))
        assert _has_colour(pixels, STYLE_PALETTE["ink"]) and _has_colour(pixels, STYLE_PALETTE["ground"]), path.name
        assert not any(_has_colour(pixels, rgb, tolerance=6) for rgb in (RING_RGB, DISC_RGB, DIAMOND_RGB)), path.name
    again = make_style_dataset(tmp_path / "b", n_images=6)
    assert [p.read_bytes() for p in _pairs(again / "2_qvst style")[0]] == [p.read_bytes() for p in images]
