"""Dataset tools on generated folders: check, captions from file names, tags, the repeats/epochs/steps plan."""

from __future__ import annotations

import json
import shutil
import string
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from xlbake import cli
from xlbake.data.demo import make_demo_dataset
from xlbake.dataset.cli import main as dataset
from xlbake.dataset.tools import (
    approx_tokens,
    captions_from_filenames,
    check_dataset,
    dhash,
    edit_caption,
    edit_tags,
    near_duplicates,
    phash,
    suggest_repeats,
    tag_frequencies,
    token_counter,
)
from xlbake.errors import InputError

APPROX = token_counter(None)  # the test environment has no cached SDXL tokenizer: the approximate count


def image(path: Path, size=(64, 48), caption: str | None = None) -> Path:
    """A noise picture seeded by its path (different files never look alike) and optionally its caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(zlib.crc32(str(path).encode())).integers(0, 256, (size[1], size[0], 3))
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def clip_tokenizer(folder: Path) -> Path:
    """A diffusers-style folder with a tiny CLIP BPE tokenizer: letters, "re" and "red" merged, nothing else."""
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(parents=True)
    letters = string.ascii_lowercase
    vocab = [*letters, *(c + "</w>" for c in letters), "re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    (tokenizer / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tokenizer / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    return folder


@pytest.fixture
def messy(tmp_path):
    """The demo dataset (6 distinct images) plus one of each problem the check looks for."""
    root = make_demo_dataset(tmp_path / "data", n_images=6)
    concept = root / "2_xlbk emblem"
    copy = Image.open(concept / "001.png").convert("RGB")
    copy.resize((copy.width * 2, copy.height * 2)).save(concept / "001 copy.jpg", quality=80)  # re-saved, upscaled
    (concept / "001 copy.txt").write_text("a copy of the emblem")
    (concept / "002.txt").unlink()  # missing caption
    (concept / "003.txt").write_text("  \n")  # empty caption
    (concept / "004.txt").write_text(", ".join(["red emblem"] * 30))  # 89 approximate tokens
    (concept / "005.png").write_bytes((concept / "005.png").read_bytes()[:200])  # truncated
    (concept / "anim.gif").write_bytes(b"GIF89a")
    image(root / "1_big" / "big.png", size=(160, 120), caption="a big one")
    image(root / "1_big" / "small.png", size=(40, 30), caption="a small one")
    image(root / "kafka" / "x.png", caption="folder without repeats")
    return root


def found(report) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for problem in report.problems:
        kinds.setdefault(problem.kind, set()).add(problem.path.name)
    return kinds


def test_check_reports_each_problem_once(messy):
    report = check_dataset([messy], counter=APPROX, min_pixels=60 * 60)
    assert found(report) == {
        "unreadable_image": {"005.png"},
        "small_image": {"small.png"},
        "near_duplicate": {"001.png"},  # "001 copy.jpg" sorts first and is the one kept
        "long_caption": {"004.png"},
        "missing_caption": {"002.png"},
        "empty_caption": {"003.txt"},
        "unsupported_file": {"anim.gif"},
        "no_repeats": {"kafka"},
    }
    assert (report.n_images, report.n_train, report.n_folders) == (10, 6, 2)  # 4 readable captioned emblems + 2 big
    assert "approximate" in report.tokens
    message = {p.kind: p.message for p in report.problems}
    assert "40x30" in message["small_image"] and "upscale" in message["small_image"]
    assert "89 tokens > 75" in message["long_caption"]
    assert "001 copy.jpg" in message["near_duplicate"]


def test_long_captions_counted_with_the_real_tokenizer(tmp_path):
    counter = token_counter(clip_tokenizer(tmp_path / "model"))
    assert counter.exact and "tokenizer" in counter.description
    caption = " ".join(["red"] * 20 + ["zzqx"] * 20)  # 20 + 20 x 4 = 100 real tokens, 40 approximate
    assert (counter.count(caption), approx_tokens(caption), counter.count("red, zzqx")) == (100, 40, 6)
    image(tmp_path / "data" / "1_c" / "a.png", caption=caption)
    assert found(check_dataset([tmp_path / "data"], counter=counter, min_pixels=1)) == {"long_caption": {"a.png"}}
    assert found(check_dataset([tmp_path / "data"], counter=APPROX, min_pixels=1)) == {}
    with pytest.raises(InputError, match="no CLIP tokenizer"):
        token_counter(tmp_path / "data")


def test_perceptual_hashes_tell_copies_from_other_pictures(tmp_path):
    root = make_demo_dataset(tmp_path, n_images=8)
    pictures = [Image.open(p).convert("RGB") for p in sorted((root / "2_xlbk emblem").glob("*.png"))]
    for hasher in (phash, dhash):
        codes = [hasher(p) for p in pictures]
        distinct = min(bin(a ^ b).count("1") for i, a in enumerate(codes) for b in codes[:i])
        assert distinct > 8, hasher.__name__
        resized = hasher(pictures[0].resize((pictures[0].width // 2, pictures[0].height // 2)))
        assert bin(resized ^ codes[0]).count("1") <= 6, hasher.__name__
    hashes = {Path("a"): 0b1111, Path("b"): 0b1110, Path("c"): 0xFFFF0000, Path("d"): 0b0111}
    assert near_duplicates(hashes, 1) == [(Path("b"), Path("a"), 1), (Path("d"), Path("a"), 1)]
    assert near_duplicates(hashes, 0) == []


def test_check_cli_table_strict_exit_and_json(messy, tmp_path):
    runner = CliRunner()
    args = ["check", str(messy), "--min-pixels", "3600"]
    result = runner.invoke(dataset, args)
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines()[2:] if line and not line[0].isupper()]
    assert rows[:2] == ["unreadable_image", "small_image"]  # grouped: broken images first
    assert "8 problem(s)" in result.output and "1_big/small.png" in result.output
    out = tmp_path / "report.json"
    assert runner.invoke(dataset, [*args, "--strict", "--json", str(out)]).exit_code == 1
    data = json.loads(out.read_text())
    assert (data["images"], data["train"], len(data["problems"])) == (10, 6, 8)
    refused = runner.invoke(dataset, [*args, "--json", str(out)])
    assert refused.exit_code == 1 and "exists" in refused.output
    (messy / "kafka").rename(messy / "1_kafka")
    shutil.rmtree(messy / "2_xlbk emblem")
    ok = runner.invoke(cli.main, ["dataset", "check", str(messy), "--strict", "--min-pixels", "1"])
    assert ok.exit_code == 0 and "No problems found." in ok.output, ok.output


def test_captions_from_filenames_strip_copy_suffix_and_keep_existing(tmp_path):
    folder = tmp_path / "2_kncr"
    image(folder / "a woman wearing kncr outfit.png")
    image(folder / "a woman wearing kncr outfit (2).png")
    image(folder / "kncr outfit, with a helmet.png", caption="hand written\n")
    result = captions_from_filenames(tmp_path)
    assert (len(result.written), len(result.kept)) == (2, 1)
    assert (folder / "a woman wearing kncr outfit (2).txt").read_text() == "a woman wearing kncr outfit\n"
    assert (folder / "kncr outfit, with a helmet.txt").read_text() == "hand written\n"
    output = CliRunner().invoke(dataset, ["captions-from-filenames", str(tmp_path)]).output
    assert "Wrote 0" in output and "Kept 3 existing" in output and "kncr outfit, with a helmet.txt" in output
    assert CliRunner().invoke(dataset, ["captions-from-filenames", str(tmp_path), "--force"]).exit_code == 0
    assert (folder / "kncr outfit, with a helmet.txt").read_text() == "kncr outfit, with a helmet\n"


@pytest.mark.parametrize(
    ("line", "options", "expected"),
    [
        ("1girl, solo, long hair", {"add": ["femme ewpp"]}, "femme ewpp, 1girl, solo, long hair"),
        ("ewpp, 1girl, solo", {"add": ["femme"], "keep": 1}, "ewpp, femme, 1girl, solo"),
        ("1girl, solo, long hair", {"remove": ["Solo", "hair"]}, "1girl, long hair"),
        ("a woman wearing kncr outfit", {"add": ["kncr"]}, "a woman wearing kncr outfit"),  # already there
        ("a woman with blonde hair", {"remove": ["blonde hair", "woman"]}, "a woman with blonde hair"),
        ("a woman, blonde hair, smiling", {"remove": ["blonde hair"]}, "a woman, smiling"),
        ("1girl,solo", {"add": ["solo"]}, "1girl,solo"),  # nothing to do: written as it was
        ("", {"add": ["ewpp", "ewpp"]}, "ewpp"),
    ],
)
def test_edit_caption(line, options, expected):
    assert edit_caption(line, **options) == expected


def test_tags_edit_folder_dry_run_and_frequencies(tmp_path):
    image(tmp_path / "1_a" / "x.png", caption="1girl, solo\nsecond line kept\n")
    image(tmp_path / "1_a" / "y.png", caption="1girl, smile, watermark")
    image(tmp_path / "1_a" / "z.png")
    preview = edit_tags(tmp_path, add=["ewpp"], remove=["watermark"], dry_run=True)
    changes = [(p.name, new) for p, _, new in preview.changed]
    assert changes == [("x.txt", "ewpp, 1girl, solo"), ("y.txt", "ewpp, 1girl, smile")]
    assert (tmp_path / "1_a" / "y.txt").read_text() == "1girl, smile, watermark"  # untouched
    assert [p.name for p in preview.no_caption] == ["z.png"]
    runner = CliRunner()
    result = runner.invoke(dataset, ["tags", str(tmp_path), "--add", "ewpp", "--remove", "watermark", "--freq"])
    assert result.exit_code == 0 and "Changed 2 caption file(s); 0 unchanged." in result.output
    assert (tmp_path / "1_a" / "x.txt").read_text() == "ewpp, 1girl, solo\nsecond line kept\n"
    assert tag_frequencies(tmp_path) == ([("1girl", 2), ("ewpp", 2), ("smile", 1), ("solo", 1)], 2)
    assert ["2", "100%", "ewpp"] in [line.split() for line in result.output.splitlines()]
    again = runner.invoke(dataset, ["tags", str(tmp_path), "--add", "ewpp"])
    assert "Changed 0 caption file(s); 2 unchanged." in again.output
    assert runner.invoke(dataset, ["tags", str(tmp_path)]).exit_code == 2  # nothing asked


def test_t_method_golden():
    """The guide's outfits: 20, 33, 100, 50 images at 5, 3, 1, 2 repeats = 399 = T, about 100 per outfit."""
    picked = [suggest_repeats(n, 100)[0] for n in (20, 33, 100, 50)]
    assert picked == [5, 3, 1, 2]
    assert sum(n * r for n, r in zip((20, 33, 100, 50), picked, strict=True)) == 399
    trimmed = [suggest_repeats(n, 100)[1:] for n in (23, 49, 100, 79)]  # before the guide deleted images
    assert trimmed == [(5, 20), (3, 33), (1, 100), (2, 50)]


def test_plan_cli_on_a_multi_concept_folder(tmp_path):
    for name, count in (("1_zetadef", 20), ("1_zetasummer", 33), ("1_zetadark", 100), ("1_zetahalloween", 50)):
        for i in range(count):
            image(tmp_path / name / f"{i}.png", size=(8, 8), caption=name)
    image(tmp_path / "1_zetadef" / "uncaptioned.png", size=(8, 8))
    args = ["dataset", "plan", str(tmp_path), "--epochs", "10", "--batch", "2", "--grad-accum", "1"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.startswith("1_")}
    assert {name: row[5] for name, row in rows.items()} == {
        "1_zetadef": "5", "1_zetasummer": "3", "1_zetadark": "1", "1_zetahalloween": "2"
    }  # fmt: skip
    assert "T = 203 images x repeats" in result.output and "1020 in total" in result.output
    assert "With the suggested repeats: T = 399, 2000 steps in total" in result.output  # the guide's 400T row
    assert "1 image(s) left out (unreadable, or without a usable caption)" in result.output


@pytest.fixture
def emma(tmp_path):
    """datasets/emma: 5 captioned images, 3 uncaptioned, 1 corrupt (captioned) in "10_ohwx woman"; 2 in misc/."""
    root = tmp_path / "datasets" / "emma"
    concept = root / "10_ohwx woman"
    for i in range(5):
        image(concept / f"ok{i}.png", size=(64, 64), caption="ohwx woman")
    for i in range(3):
        image(concept / f"img0{i}.png", size=(64, 64))
    corrupt = image(concept / "zz.png", size=(64, 64), caption="ohwx woman")
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    image(root / "misc" / "m0.png", size=(64, 64), caption="not trained")
    image(root / "misc" / "m1.png", size=(64, 64), caption="not trained")
    return root


def test_check_plan_and_trainer_count_the_same_images(emma, tmp_path):
    from finetune.captions import CaptionConfig
    from finetune.data import DataConfig, read_training_data

    report = check_dataset([emma], counter=APPROX, min_pixels=1)
    assert (report.n_images, report.n_train, report.n_folders) == (11, 5, 1)
    runner = CliRunner()
    checked = runner.invoke(dataset, ["check", str(emma), "--min-pixels", "1"])
    assert "11 image(s) found: 5 train" in checked.output, checked.output
    planned = runner.invoke(dataset, ["plan", str(emma), "--epochs", "1", "--grad-accum", "1"])
    assert planned.exit_code == 0, planned.output
    assert "T = 50 images x repeats" in planned.output  # 5 images x 10 repeats: neither uncaptioned nor corrupt
    assert "4 image(s) left out" in planned.output
    cfg = DataConfig(roots=(emma,), resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=8,
                     on_bad_image="skip")  # fmt: skip
    trained = read_training_data(cfg, CaptionConfig())
    assert (len(trained.samples), len(trained.skipped)) == (5, 4)
    assert any(path.name == "misc" for path, _ in trained.notes)


def test_a_concept_folder_as_root_is_refused_alike_by_check_plan_and_trainer(emma):
    from finetune.captions import CaptionConfig
    from finetune.data import DataConfig, read_training_data

    concept = emma / "10_ohwx woman"
    for args in (["check", str(concept)], ["plan", str(concept)]):
        result = CliRunner().invoke(dataset, args)
        assert result.exit_code == 1 and f"pass its parent {emma}" in result.output, result.output
    with pytest.raises(InputError, match=f"pass its parent {emma}"):
        read_training_data(DataConfig(roots=(concept,)), CaptionConfig())


def test_caption_and_tag_tools_write_only_where_the_trainer_reads(emma):
    result = captions_from_filenames(emma)
    assert result.written == () and {p.name for p in result.empty} == {"img00.png", "img01.png", "img02.png"}
    assert [p.name for p in result.skipped] == ["misc"]
    assert not (emma / "10_ohwx woman" / "img00.txt").exists()
    output = CliRunner().invoke(dataset, ["captions-from-filenames", str(emma)]).output
    assert "generic" in output and "misc" in output, output
    edit = edit_tags(emma, add=["ewpp"])
    assert len(edit.changed) == 6 and [p.name for p in edit.skipped] == ["misc"]
    assert (emma / "misc" / "m0.txt").read_text() == "not trained"
