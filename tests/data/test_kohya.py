"""Scanning kohya-layout folders and dataset TOMLs on small synthetic datasets."""

from pathlib import Path

import pytest
from PIL import Image

from xlbake.data.kohya import (
    Item,
    caption_from_filename,
    image_size,
    read_dataset,
    scan_dataset,
    scan_folders,
    scan_toml,
    verify_image,
)
from xlbake.errors import InputError


def image(path: Path, size=(40, 24), caption: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture
def layout(tmp_path):
    """root/2_xlbk emblem: a (2 lines), B (.JPG), c (no caption), notes.md, orphan.txt; root/misc; root/loose.png."""
    concept = tmp_path / "root" / "2_xlbk emblem"
    image(concept / "a.png", caption="a red emblem\nsecond line\n")
    image(concept / "B.JPG", caption="  a blue emblem  ")
    image(concept / "c.png")
    (concept / "notes.md").write_text("hi")
    (concept / "orphan.txt").write_text("no image")
    image(tmp_path / "root" / "misc" / "d.png", caption="ignored")
    image(tmp_path / "root" / "loose.png", caption="ignored")
    image(tmp_path / "root" / "1_empty" / "e.png", caption="")
    return tmp_path / "root"


def kinds(scan) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for problem in scan.problems:
        found.setdefault(problem.kind, set()).add(problem.path.name)
    return found


def test_scan_folders_reads_repeats_names_and_captions(layout):
    scan = scan_folders([layout])
    empty, concept = scan.subsets  # sorted by folder name
    assert (concept.repeats, concept.name, concept.root) == (2, "xlbk emblem", layout / "2_xlbk emblem")
    assert [(i.image.name, i.caption) for i in concept.items] == [("B.JPG", "a blue emblem"), ("a.png", "a red emblem")]
    assert empty.items == () and scan.n_images == 2
    assert kinds(scan) == {
        "multiline_caption": {"a.txt"},
        "missing_caption": {"c.png"},
        "unsupported_file": {"notes.md"},
        "orphan_caption": {"orphan.txt"},
        "no_repeats": {"misc"},
        "outside_subset": {"loose.png"},
        "empty_caption": {"e.txt"},
        "empty_subset": {"1_empty"},
    }


def test_caption_sources(layout):
    by_source = {}
    for source in ("filename", "file_or_filename", "file_or_folder"):
        items = scan_folders([layout], caption_source=source).subsets[1].items
        by_source[source] = {i.image.name: i.caption for i in items}
    assert by_source["filename"] == {"a.png": "a", "B.JPG": "B", "c.png": "c"}
    assert by_source["file_or_filename"] == {"a.png": "a red emblem", "B.JPG": "a blue emblem", "c.png": "c"}
    assert by_source["file_or_folder"]["c.png"] == "xlbk emblem"


def test_caption_from_filename_strips_only_copy_suffixes():
    assert caption_from_filename("a woman wearing kncr outfit (2)") == "a woman wearing kncr outfit"
    assert caption_from_filename("photo of kncr 01") == "photo of kncr 01"
    assert caption_from_filename("version (2) final") == "version (2) final"


def test_caption_extension_and_image_extensions(tmp_path):
    image(tmp_path / "3_x" / "a.png")
    (tmp_path / "3_x" / "a.caption").write_text("from caption file")
    image(tmp_path / "3_x" / "b.webp", caption="webp")
    scan = scan_folders([tmp_path], caption_extension="caption", image_extensions=(".png",))
    assert [(i.image.name, i.caption) for i in scan.subsets[0].items] == [("a.png", "from caption file")]
    assert kinds(scan)["unsupported_file"] == {"b.webp", "b.txt"}


def test_sizes_are_read_lazily_with_exif_rotation(tmp_path):
    plain = image(tmp_path / "plain.png", size=(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 24 x 40
    rotated = image(tmp_path / "rotated.jpg", size=(40, 24), exif=exif)
    assert Item(plain, "x").size == (40, 24)
    assert image_size(rotated) == (24, 40) == verify_image(rotated)


def test_corrupt_and_truncated_images(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match="junk.png"):
        image_size(junk)
    good = image(tmp_path / "big.png", size=(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    assert image_size(truncated) == (64, 64)  # the header is intact
    with pytest.raises(InputError, match="truncated.png"):
        verify_image(truncated)


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        scan_folders([tmp_path / "nope"])


TOML = """
[general]
caption_extension = ".txt"
shuffle_caption = true

[[datasets]]
resolution = 1024
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = "cats"
  num_repeats = 3
  class_tokens = "xlbk cat"
  caption_dropout_rate = 0

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
"""


def test_scan_toml(tmp_path):
    image(tmp_path / "cats" / "a.png", caption="a cat")
    image(tmp_path / "cats" / "b.png")
    image(tmp_path / "reg" / "r.png", caption="a cat")
    (tmp_path / "dataset.toml").write_text(TOML)
    scan = scan_toml(tmp_path / "dataset.toml", caption_source="file_or_folder")
    (subset,) = scan.subsets
    assert (subset.root, subset.repeats, subset.name) == (tmp_path / "cats", 3, "xlbk cat")
    assert [i.caption for i in subset.items] == ["a cat", "xlbk cat"]  # class tokens for the uncaptioned image
    assert subset.caption_options == (("shuffle", True), ("keep_tokens", 1), ("dropout_rate", 0.0))
    messages = " ".join(p.message for p in scan.problems)
    assert "datasets[0].resolution: ignored (set data.resolution" in messages
    assert "regularization images" in messages
    both = scan_dataset([tmp_path], tmp_path / "dataset.toml", caption_source="file_or_folder")
    assert both.subsets[-1] == subset


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[datasets]\n")
    with pytest.raises(InputError, match="not a valid TOML"):
        scan_toml(bad)
    bad.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "missing"\n')
    with pytest.raises(InputError, match="image_dir"):
        scan_toml(bad)
    image(tmp_path / "cats" / "a.png", caption="a cat")
    bad.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "cats"\nkeep_tokens = "two"\n')
    with pytest.raises(InputError, match="keep_tokens must be int"):
        scan_toml(bad)


def test_read_dataset_decodes_every_image_and_counts_what_it_leaves_out(layout):
    concept = layout / "2_xlbk emblem"
    (concept / "z.png").write_bytes(image(concept / "z.png", caption="corrupt").read_bytes()[:60])
    scan = read_dataset([layout])
    assert [i.image.name for s in scan.subsets for i in s.items] == ["B.JPG", "a.png"]
    assert kinds(scan)["unreadable_image"] == {"z.png"}
    assert [i.size for i in scan.subsets[1].items] == [(40, 24), (40, 24)]
    assert {p.name for p in scan.ignored} == {"d.png", "loose.png"}
    assert (scan.n_images, scan.n_found) == (2, 7)  # a, B + c (no caption), z (corrupt), e (empty) + d, loose


def test_a_concept_folder_given_as_root_points_at_its_parent(layout):
    with pytest.raises(InputError, match=r"pass its parent .*root as the dataset root"):
        scan_folders([layout / "2_xlbk emblem"])


def test_generic_file_names_give_no_caption(tmp_path):
    for stem in ("img06", "IMG_1234", "DSC00012 (2)", "photo_01", "00017", "image"):
        assert caption_from_filename(stem) == "", stem
    image(tmp_path / "1_x" / "img06.png")
    scan = scan_folders([tmp_path], caption_source="filename")
    assert scan.n_images == 0 and "generic" in scan.problems[0].message


def test_toml_training_keys_say_what_to_do(tmp_path):
    image(tmp_path / "cats" / "a.png", caption="a cat")
    toml = '[general]\nenable_bucket = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "cats"\n'
    (tmp_path / "d.toml").write_text(toml)
    (problem,) = scan_toml(tmp_path / "d.toml").problems
    assert problem.message == "general.enable_bucket: ignored (xlbake always buckets by aspect ratio)"
