"""Sample grids: exact sheet layout and labels, column naming, and a real 2x3 grid rendered on the tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from xlbake.errors import OutputError
from xlbake.evaluate.grid import GridColumn, SampleSettings, column_labels, grid_columns, load_pipeline, save_grid
from xlbake.evaluate.render import render_images
from xlbake.evaluate.sheet import _fit, _font, grid_geometry, layout_grid
from xlbake.lora.io import lora_metadata, write_lora
from xlbake.lora.names import kohya_targets

COLORS = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]


def solid_cells(size=(64, 64)):
    return [[Image.new("RGB", size, color) for color in row] for row in COLORS]


def ink(image: Image.Image, box) -> int:
    """Dark (text) pixels inside ``box`` of a white-background sheet."""
    return int((np.asarray(image.crop(box).convert("L")) < 128).sum())


def test_two_by_three_sheet_has_exact_size_and_cells_in_place():
    sheet = layout_grid(solid_cells(), ["a red emblem", "a blue emblem"], ["base", "tuned", "tuned + LoRA"])
    # 64 px cells: 12 px font, 15 px lines, 6 px padding, 2 px gaps, 120 px prompt column, 3-line header of 57 px.
    assert sheet.size == (120 + 3 * (64 + 2) + 2, 57 + 2 * (64 + 2) + 2) == (320, 191)
    geo = grid_geometry(2, 3, (64, 64))
    for row in range(2):
        for col in range(3):
            pixels = np.asarray(sheet.crop(geo.cell_box(row, col))).reshape(-1, 3)
            assert (pixels == COLORS[row][col]).all(), (row, col)
    assert geo.cell_box(1, 2) == (120 + 2 + 2 * 66, 57 + 2 + 66, 120 + 2 + 2 * 66 + 64, 57 + 2 + 66 + 64)
    titled = layout_grid(solid_cells(), ["a", "b"], ["x", "y", "z"], title="seed 0")
    assert titled.size == (320, 191 + 15 + 2 * 6)


def test_labels_are_drawn_in_their_boxes():
    sheet = layout_grid(solid_cells(), ["a red emblem", ""], ["base", "", "lora-dim8\nweight 0.8"])
    geo = grid_geometry(2, 3, (64, 64))
    header = [(left, 0, right, geo.header_height) for left, _, right, _ in (geo.cell_box(0, c) for c in range(3))]
    assert ink(sheet, header[0]) > 0 and ink(sheet, header[1]) == 0 and ink(sheet, header[2]) > ink(sheet, header[0])
    first, second = geo.cell_box(0, 0), geo.cell_box(1, 0)
    assert ink(sheet, (0, first[1], geo.label_width, first[3])) > 0
    assert ink(sheet, (0, second[1], geo.label_width, second[3])) == 0


def test_long_labels_wrap_and_are_cut_with_an_ellipsis():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = _font(12)
    lines = _fit(draw, "a very long prompt " * 20 + "x" * 80, font, 100, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 100 for line in lines)
    assert _fit(draw, "two\nlines", font, 100, 3) == ["two", "lines"]


def test_cells_of_different_sizes_are_refused():
    cells = solid_cells()
    cells[1][2] = Image.new("RGB", (32, 64))
    with pytest.raises(ValueError, match="64x64"):
        layout_grid(cells, ["a", "b"], ["x", "y", "z"])


def test_loras_go_on_the_base_only_unless_asked():
    """The first --model is the base: LoRAs are extracted against it, so the other models appear as they are."""
    base, tuned, lora = Path("base.safetensors"), Path("run/tuned.safetensors"), Path("run/lora-dim8.safetensors")
    assert grid_columns([base, tuned], [lora], [1.0, 0.5]) == [
        GridColumn(base, lora, 1.0),
        GridColumn(base, lora, 0.5),
        GridColumn(tuned),
    ]
    assert grid_columns([base, tuned], [lora], without_lora=True) == [
        GridColumn(base),
        GridColumn(base, lora, 1.0),
        GridColumn(tuned),
    ]
    assert grid_columns([base, tuned], [lora], lora_on_tuned=True) == [
        GridColumn(base, lora, 1.0),
        GridColumn(tuned, lora, 1.0),
    ]


def test_cpu_defaults_are_smaller_and_said_gpu_defaults_unchanged():
    from xlbake.evaluate.render import sample_defaults

    gpu = sample_defaults(torch.device("cuda"), steps=None, width=None, height=None)
    assert gpu[:3] == (30, 1024, 1024) and gpu[3] is None
    steps, width, height, note = sample_defaults(torch.device("cpu"), steps=None, width=None, height=None)
    assert steps < 30 and width < 1024 and height < 1024 and "CPU" in note and "--steps" in note
    assert sample_defaults(torch.device("cpu"), steps=7, width=64, height=96) == (7, 64, 96, None)
    assert sample_defaults(torch.device("cpu"), steps=7, width=None, height=None)[:3] == (7, width, height)


def test_columns_and_labels_name_what_varies():
    columns = grid_columns(["m/tuned.safetensors"], ["l/lora-dim8.safetensors"], [1.0, 0.6], without_lora=True)
    assert columns == [
        GridColumn(Path("m/tuned.safetensors")),
        GridColumn(Path("m/tuned.safetensors"), Path("l/lora-dim8.safetensors"), 1.0),
        GridColumn(Path("m/tuned.safetensors"), Path("l/lora-dim8.safetensors"), 0.6),
    ]
    assert column_labels(columns) == ["no LoRA", "lora-dim8\nweight 1", "lora-dim8\nweight 0.6"]
    epochs = grid_columns(["run/checkpoints/epoch-0001.safetensors", "run/checkpoints/epoch-0002.safetensors"])
    assert column_labels(epochs) == ["epoch-0001", "epoch-0002"]
    same_name = grid_columns(["a/tuned.safetensors", "b/tuned.safetensors"], ["x.safetensors"], lora_on_tuned=True)
    assert column_labels(same_name) == ["a/tuned", "b/tuned"]
    base_only = grid_columns(["a/tuned.safetensors", "b/tuned.safetensors"], ["x.safetensors"])
    assert column_labels(base_only) == ["a/tuned\nx", "b/tuned\nno LoRA"]


@pytest.fixture(scope="module")
def tiny_lora(tiny_paths, tmp_path_factory):
    """A LoRA on every UNet and text encoder layer of the tiny model, large enough to change the images."""
    from xlbake.sdxl.checkpoint import open_checkpoint

    with open_checkpoint(tiny_paths.single_file) as reader:
        targets = kohya_targets(reader.shapes(), conv=True)
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for t in targets:
        factors[t.name] = (0.3 * torch.randn(t.shape[0], 2, generator=gen), torch.randn(2, *t.shape[1:], generator=gen))
    metadata = lora_metadata(title="grid test", ranks=dict.fromkeys(factors, 2), alpha=2.0, conv_rank=2)
    return write_lora(tmp_path_factory.mktemp("lora") / "lora-r2.safetensors", factors, metadata=metadata)


def test_grid_command_renders_a_labelled_two_by_three_grid_on_the_tiny_model(tiny_paths, tiny_lora, tmp_path):
    from xlbake.evaluate.cli import grid

    out = tmp_path / "grid.png"
    args = ["--model", str(tiny_paths.single_file), "--lora", str(tiny_lora), "--weight", "1", "--weight", "0.5"]
    args += ["--without-lora", "--prompt", "a red emblem", "--prompt", "a blue circle", "--steps", "2"]
    args += ["--width", "64", "--height", "64", "--cfg", "1", "--device", "cpu", "--seed", "3", "--out", str(out)]
    result = CliRunner().invoke(grid, args)
    assert result.exit_code == 0, result.output
    messages = [line.split(": ", 1)[-1] for line in result.stderr.splitlines()]  # logged as "time LEVEL name: msg"
    estimates = [m for m in messages if m.startswith("estimated")]
    assert len(estimates) == 1 and "2 steps x 3 pipeline calls" in estimates[0], messages
    done = [m for m in messages if m.startswith("image ")]  # not a terminal: one line per image, no bar
    assert [m.split(":")[0] for m in done] == [f"image {i}/6" for i in range(1, 7)], messages

    sheet = Image.open(out)
    geo = grid_geometry(2, 3, (64, 64), title=True)
    assert sheet.size == (geo.width, geo.height) == (320, 218)
    info = json.loads(sheet.text["xlbake.grid"])
    assert info["prompts"] == ["a red emblem", "a blue circle"]
    assert [c["weight"] for c in info["columns"]] == [1.0, 1.0, 0.5] and info["columns"][0]["lora"] is None
    singles = {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "grid").glob("*.png"))}
    assert sorted(singles) == [f"r{r:02d}-c{c:02d}.png" for r in range(2) for c in range(3)]
    assert all(image.shape == (64, 64, 3) for image in singles.values())
    for row in range(2):  # the sheet shows each single image in its cell
        for col in range(3):
            np.testing.assert_array_equal(
                np.asarray(sheet.convert("RGB").crop(geo.cell_box(row, col))), singles[f"r{row:02d}-c{col:02d}.png"]
            )
    assert not np.array_equal(singles["r00-c00.png"], singles["r00-c01.png"])  # the LoRA changes the image
    assert not np.array_equal(singles["r00-c01.png"], singles["r00-c02.png"])  # and its weight matters
    assert not np.array_equal(singles["r00-c00.png"], singles["r01-c00.png"])

    # Fixed seeds: diffusers' own pipeline from the diffusers folder gives the no-LoRA column pixel for pixel.
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(str(tiny_paths.diffusers_dir))
    settings = SampleSettings(steps=2, guidance_scale=1.0, width=64, height=64, seed=3)
    for row, image in enumerate(render_images(reference, info["prompts"], settings)):
        np.testing.assert_array_equal(np.asarray(image), singles[f"r{row:02d}-c00.png"])

    again = CliRunner().invoke(grid, args)
    assert again.exit_code == 1 and "exists" in again.output


def test_single_file_loads_the_same_weights_as_the_diffusers_folder(tiny_paths):
    single = load_pipeline(tiny_paths.single_file)
    folder = load_pipeline(tiny_paths.diffusers_dir)
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part


def test_save_grid_refuses_an_existing_singles_folder(tmp_path):
    cells = solid_cells()
    columns = [GridColumn(Path("m.safetensors"), None, 1.0)] * 3
    (tmp_path / "g").mkdir()
    with pytest.raises(OutputError, match="exists"):
        save_grid(cells, ["a", "b"], columns, tmp_path / "g.png", settings=SampleSettings())
    written = save_grid(cells, ["a", "b"], columns, tmp_path / "g.png", settings=SampleSettings(), force=True)
    assert written[0] == tmp_path / "g.png" and len(written) == 7


def test_labels_wrap_between_tokens_never_inside_one():
    """A line ends at a space or after a separator (- _ / ...), never inside a name or number; a token longer than a
    line is cut visibly with "..." rather than continued on the next line."""
    import re

    token = re.compile(r"[A-Za-z0-9]+(?:\.[0-9]+)?")
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = _font(12)
    label = "lora-dim64-rank16_sv-fro checkpoints/epoch-0012 weight 0.85 a photo of xlbk emblem"
    for width in (40, 64, 90, 130, 400):
        lines = _fit(draw, label, font, width, 20)
        assert all(draw.textlength(line, font=font) <= width for line in lines), width
        whole = []
        for line in lines:
            found = token.findall(line.removesuffix("..."))
            if line.endswith("...") and found:  # the one token cut visibly
                cut = found.pop()
                assert any(t.startswith(cut) for t in token.findall(label)), (width, line)
            whole += found
        assert whole == [t for t in token.findall(label) if t in whole], (width, lines)  # whole tokens, in order
    hyphen = draw.textlength("lora-dim64-", font=font)
    assert _fit(draw, "lora-dim64-rank16", font, hyphen, 3) == ["lora-dim64-", "rank16"]
    cut = _fit(draw, "x" * 40 + " next", font, 60, 3)
    assert cut[0].endswith("...") and cut[1:] == ["next"]


def test_every_line_of_a_column_label_keeps_a_line_when_lines_run_out():
    """The weight line of a column label survives a long LoRA name above it: the long part is cut instead."""
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = _font(12)
    lines = _fit(draw, "checkpoints/epoch-0012\nlora-dim64-rank16_sv-fro-extra\nweight 0.8", font, 64, 3)
    assert len(lines) == 3 and lines[-1] == "weight 0.8" and lines[0].endswith("...") and lines[1].endswith("...")
    assert _fit(draw, "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, font, 64, 2)[-1].endswith("...")


def test_prompt_lines_set_their_own_seed_and_guidance(tiny_paths):
    from dataclasses import replace

    pipe = load_pipeline(tiny_paths.single_file)
    settings = SampleSettings(steps=1, guidance_scale=3.0, width=16, height=16, seed=0)
    rows = render_images(pipe, ["a red emblem --d 5", "a blue circle --l 1"], settings)
    alone = render_images(pipe, ["a red emblem"], replace(settings, seed=5))[0]
    second = render_images(pipe, ["a blue circle"], replace(settings, guidance_scale=1.0, seed=1))[0]
    np.testing.assert_array_equal(np.asarray(rows[0]), np.asarray(alone))
    np.testing.assert_array_equal(np.asarray(rows[1]), np.asarray(second))
    plain = render_images(pipe, ["a blue circle"], replace(settings, seed=1))[0]
    assert not np.array_equal(np.asarray(rows[1]), np.asarray(plain))


def test_rows_of_different_sizes_and_bad_options_are_refused_before_any_model_loads(tmp_path):
    from xlbake.errors import InputError
    from xlbake.evaluate.render import render_grid

    columns = [GridColumn(tmp_path / "missing.safetensors")]
    settings = SampleSettings(width=64, height=64)
    with pytest.raises(InputError, match=r"'b --w 32'.*32x64.*64x64"):
        render_grid(columns, ["a", "b --w 32"], settings)
    with pytest.raises(InputError, match=r"'b --q 1': unknown option --q"):
        render_grid(columns, ["a", "b --q 1"], settings)


def test_a_prompts_file_skips_comment_lines_and_keeps_options(tmp_path):
    from xlbake.evaluate.cli import _prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# epochs to compare\nxlbk emblem --n blurry --d 3\n\n  # indented comment\nxlbk circle\n")
    assert _prompts((), path, None, 4, 0) == ["xlbk emblem --n blurry --d 3", "xlbk circle"]
