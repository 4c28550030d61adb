"""Kept-energy report: totals weighted by energy, curves from spectra, JSON contents, a real PNG, the text table."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xlbake.errors import OutputError
from xlbake.lora.report import (
    Coverage,
    LayerStat,
    bytes_per_param,
    group_stat,
    kept_vs_rank,
    kept_vs_size,
    left_out_kind,
    print_summary,
    report_paths,
    write_report,
)


def layer(name: str, component: str, spectrum: tuple[float, ...], rank: int, width: int = 10) -> LayerStat:
    energy = sum(s * s for s in spectrum)
    kept = sum(s * s for s in spectrum[:rank]) / energy
    return LayerStat(name, component, rank, energy, kept, rank * 2 * width, spectrum)


LAYERS = [
    layer("lora_unet_a", "unet", (3.0, 2.0, 1.0), 2),  # energy 14, kept 13/14
    layer("lora_unet_b", "unet", (2.0, 1.0, 1.0, 1.0), 2),  # energy 7, kept 5/7
    layer("lora_te1_c", "te1", (1.0, 1.0), 1),  # energy 2, kept 1/2
]


def test_totals_are_energy_weighted():
    unet = group_stat(LAYERS[:2])
    assert unet.kept == pytest.approx(18 / 21)
    assert unet.rel_error == pytest.approx(math.sqrt(3 / 21))
    assert (unet.modules, unet.params, unet.ranks) == (2, 80, "2")
    total = group_stat(LAYERS)
    assert total.kept == pytest.approx(19 / 23)
    assert total.ranks == "1-2"
    assert group_stat([LayerStat("lora_unet_z", "unet", 1, 0.0, 0.0, 20)]).kept == 1.0  # nothing changed


def test_kept_vs_rank_is_the_energy_weighted_curve():
    curve = kept_vs_rank(LAYERS[:2])
    # rank 1: 9 + 4, rank 2: 13 + 5, rank 3: 14 + 6 (layer a ends), rank 4: 14 + 7, all over 21.
    np.testing.assert_allclose(curve, [0, 13 / 21, 18 / 21, 20 / 21, 1.0])
    assert kept_vs_rank(LAYERS)[-1] == pytest.approx(1.0)


def test_best_allocation_takes_most_energy_per_byte_first():
    cheap = LayerStat("lora_te1_x", "te1", 1, 0.41, 0.25 / 0.41, 1, (0.5, 0.4))  # 1 parameter per rank
    dear = LayerStat("lora_unet_y", "unet", 1, 1.01, 1 / 1.01, 10, (1.0, 0.1))  # 10 parameters per rank
    curves = kept_vs_size([cheap, dear], bytes_per_param=1e6)  # 1 MB per parameter keeps numbers readable
    mb, kept = curves["best allocation"]
    np.testing.assert_allclose(mb, [1, 2, 12, 22])
    np.testing.assert_allclose(kept, np.cumsum([0.25, 0.16, 1.0, 0.01]) / 1.42)
    same_mb, same_kept = curves["same rank"]
    np.testing.assert_allclose(same_mb, [11, 22])
    np.testing.assert_allclose(same_kept, [1.25 / 1.42, 1.0])
    assert np.interp(11, mb, kept) >= same_kept[0]  # the budgeted curve is never below the fixed-rank one


def test_write_report_json_and_png(tmp_path):
    out = tmp_path / "lora-dim2.safetensors"
    out.write_bytes(b"\0" * 400)  # stands in for the LoRA: 400 bytes for 100 parameters
    summary = {"method": "fixed", "source": Path("/x/base.safetensors"), "bad": float("nan")}
    json_path, png_path = write_report(out, LAYERS, summary, title="unit report", force=False)
    assert (json_path, png_path) == report_paths(out)
    assert json_path.name == "lora-dim2.report.json" and png_path.name == "lora-dim2.report.png"
    report = json.loads(json_path.read_text())
    assert report["summary"] == {"method": "fixed", "source": "/x/base.safetensors", "bad": None}
    assert report["file_mb"] == pytest.approx(400 / 1e6)
    assert [row["name"] for row in report["layers"]] == ["lora_unet_a", "lora_unet_b", "lora_te1_c"]
    first = report["layers"][0]
    assert first["kept_energy"] == pytest.approx(13 / 14)
    assert first["rel_error"] == pytest.approx(math.sqrt(1 / 14))
    assert (first["rank"], first["params"], first["energy"]) == (2, 40, pytest.approx(14.0))
    assert report["components"]["unet"]["kept_energy"] == pytest.approx(18 / 21)
    assert report["components"]["te1"]["modules"] == 1
    assert report["total"]["kept_energy"] == pytest.approx(19 / 23)
    assert report["total"]["rel_error"] == pytest.approx(math.sqrt(4 / 23))
    assert report["kept_vs_rank"]["te1"] == pytest.approx([0, 0.5, 1.0])
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 400
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # curves, markers and text, not a blank canvas


def test_write_report_without_spectra_and_refusals(tmp_path):
    plain = [LayerStat("lora_unet_a", "unet", 4, 2.0, 0.9, 80)]
    out = tmp_path / "r.safetensors"
    json_path, png_path = write_report(out, plain, {}, title="no spectra", force=False)
    assert png_path.stat().st_size > 0
    assert json.loads(json_path.read_text())["file_mb"] is None
    before = json_path.read_bytes(), png_path.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        write_report(out, LAYERS, {}, title="again", force=False)
    assert (json_path.read_bytes(), png_path.read_bytes()) == before
    write_report(out, LAYERS, {}, title="again", force=True)
    assert json.loads(json_path.read_text())["title"] == "again"
    with pytest.raises(ValueError, match="no layers"):
        write_report(tmp_path / "e.safetensors", [], {}, title="empty", force=False)


def test_print_summary_table():
    text = print_summary(LAYERS, {"save_precision": "fp32"})
    lines = text.splitlines()
    assert lines[0].split() == ["component", "modules", "rank(s)", "kept", "energy", "rel.", "error", "MB"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == ["unet", "te1", "total"]
    assert rows["unet"][1:4] == ["2", "2", f"{18 / 21 * 100:.2f}%"]
    assert rows["total"][2] == "1-2"
    assert float(rows["total"][4]) == pytest.approx(math.sqrt(4 / 23), abs=1e-4)
    assert [float(rows[c][5]) for c in rows] == [0.0, 0.0, 0.0]  # 100 parameters at 4 bytes: 0.0004 MB
    scaled = print_summary(LAYERS, {"bytes_per_param": 1e4}).splitlines()
    assert [float(line.split()[5]) for line in scaled[1:]] == [0.8, 0.2, 1.0]


def test_bytes_per_param_from_summary():
    assert bytes_per_param({"save_precision": "fp32"}) == 4.0
    assert bytes_per_param({"dtype": "torch.bfloat16"}) == 2.0
    assert bytes_per_param({"bytes_per_param": 1}) == 1.0
    assert bytes_per_param({}) == 2.0


COVERAGE = Coverage(covered=0.5, left_out={"3x3 convs": 0.3, "norms": 0.2})


def test_coverage_says_what_share_of_the_finetune_is_covered_and_kept(tmp_path):
    """Kept of covered (19/23) times covered (50 %) is what the LoRA keeps of the whole finetune."""
    assert COVERAGE.kept_of_finetune(LAYERS) == pytest.approx(0.5 * 19 / 23)
    resized = Coverage(covered=0.5, left_out=COVERAGE.left_out, input_kept=0.8)  # a resize of a LoRA keeping 80 %
    assert resized.kept_of_covered(LAYERS) == pytest.approx(0.8 * 19 / 23)
    text = print_summary(LAYERS, {"save_precision": "fp32"}, coverage=COVERAGE)
    assert "covered: 50.0 % of the finetune (tuned - base); left out: 3x3 convs 30.0 %, norms 20.0 %" in text
    assert f"kept of finetune: {0.5 * 19 / 23 * 100:.1f} %" in text
    out = tmp_path / "lora.safetensors"
    json_path, _ = write_report(out, LAYERS, {}, title="covered", force=False, coverage=COVERAGE)
    finetune = json.loads(json_path.read_text())["finetune"]
    assert finetune["covered"] == 0.5 and finetune["left_out"] == {"3x3 convs": 0.3, "norms": 0.2}
    assert finetune["kept_of_covered"] == pytest.approx(19 / 23)
    assert finetune["kept_of_finetune"] == pytest.approx(0.5 * 19 / 23)
    assert Coverage.from_dict(json.loads(json.dumps(COVERAGE.as_dict(LAYERS)))) == Coverage(
        0.5, COVERAGE.left_out, input_kept=pytest.approx(19 / 23)
    )


def test_left_out_kinds_name_the_tensors_a_lora_does_not_hold():
    assert left_out_kind("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", (32, 32, 3, 3)) == "3x3 convs"
    assert left_out_kind("model.diffusion_model.out.0.weight", (32,)) == "norms"
    assert left_out_kind("model.diffusion_model.out.2.bias", (4,)) == "biases"
    assert left_out_kind("conditioner.embedders.1.model.token_embedding.weight", (952, 64)) == "embeddings"
    assert left_out_kind("conditioner.embedders.1.model.positional_embedding", (77, 64)) == "embeddings"
    assert left_out_kind("model.diffusion_model.time_embed.0.weight", (128, 32)) == "other linear layers"
    assert left_out_kind("conditioner.embedders.1.model.text_projection", (64, 32)) == "other linear layers"


def test_matplotlib_is_imported_only_to_plot():
    # a resize or extract without a report should not pay matplotlib's import (about a second)
    code = "import sys, resize.pipeline, extract.pipeline; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
