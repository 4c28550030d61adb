"""extract: what the LoRA covers of the whole finetune, caps and budgets said before any SVD, swapped inputs."""

import json

import pytest
import torch

import extract.pipeline
from extract.config import ExtractConfig
from extract.pipeline import run_extract
from xlbake.errors import ConfigError, InputError
from xlbake.lora.io import read_lora
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import open_checkpoint, save_sgm_checkpoint
from xlbake.sdxl.keys import SGM_PREFIX

MODEL = tuple(SGM_PREFIX[part] for part in ("unet", "text_encoder", "text_encoder_2"))


@pytest.fixture(scope="module")
def everywhere(tiny_paths, tmp_path_factory):
    """Tuned = base + noise in every UNet and text-encoder float tensor (3x3 convs, norms, embeddings too), as a
    finetune changes them; its metadata names its base, as the finetune stage writes it."""
    gen = torch.Generator().manual_seed(3)
    with open_checkpoint(tiny_paths.single_file) as reader:
        base = {key: reader.get(key).clone() for key in reader}
    changed = [key for key, value in base.items() if value.is_floating_point() and key.startswith(MODEL)]
    tuned = {**base, **{key: base[key] + 1e-3 * torch.randn(base[key].shape, generator=gen) for key in changed}}
    meta = {"xlbake.stage": "finetune", "xlbake.base": str(tiny_paths.single_file.absolute())}
    path = save_sgm_checkpoint(tuned, tmp_path_factory.mktemp("everywhere") / "tuned.safetensors", metadata=meta)
    energy = {key: float((tuned[key].double() - base[key].double()).square().sum()) for key in base}
    return path, energy


def _run(base, tuned, out, lines, **options):
    cfg = ExtractConfig(base=base, tuned=tuned, out=out, save_precision="fp32", **options)
    return run_extract(cfg, echo=lines.append)


def test_report_says_what_share_of_the_finetune_the_lora_covers_and_keeps(tiny_paths, everywhere, tmp_path):
    tuned, energy = everywhere
    lines = []
    (out,) = _run(tiny_paths.single_file, tuned, tmp_path / "lora.safetensors", lines, dim=(64,)).outputs
    with open_checkpoint(tiny_paths.single_file) as reader:
        shapes = reader.shapes()
    targeted = {t.key for t in kohya_targets(shapes, conv=False)}
    total = sum(e for key, e in energy.items() if key.startswith(MODEL))
    covered = sum(energy[key] for key in targeted) / total
    assert 0.05 < covered < 0.95
    report = json.loads(out.with_name("lora.report.json").read_text())
    finetune = report["finetune"]
    assert finetune["covered"] == pytest.approx(covered, rel=1e-6)
    assert finetune["kept_of_covered"] == pytest.approx(report["total"]["kept_energy"])
    assert finetune["kept_of_finetune"] == pytest.approx(covered * report["total"]["kept_energy"], rel=1e-6)
    assert finetune["covered"] + sum(finetune["left_out"].values()) == pytest.approx(1.0)
    assert {"3x3 convs", "norms", "biases", "embeddings"} <= set(finetune["left_out"])
    text = "\n".join(lines)
    assert f"covered: {covered * 100:.1f} % of the finetune" in text and "3x3 convs" in text
    assert "kept of finetune:" in text
    carried = json.loads(read_lora(out).metadata["xlbake_coverage"])
    assert carried["covered"] == pytest.approx(covered, rel=1e-5)


def test_caps_are_said_before_factoring(tiny_paths, everywhere, tmp_path):
    """Every tiny layer has a rank <= 64: dim 128 is capped everywhere, dim 64 in TE1 (rank 32)."""
    lines = []
    _run(tiny_paths.single_file, everywhere[0], tmp_path / "lora.safetensors", lines, dim=(64, 128))
    factoring = next(i for i, line in enumerate(lines) if line.startswith("factoring"))
    caps = [line for line in lines[:factoring] if "capped" in line]
    assert len(caps) == 2, lines
    assert caps[0].startswith("lora-dim64: 18 of 168 layers") and "te1 18 at 32" in caps[0]
    assert caps[1].startswith("lora-dim128: 168 of 168 layers") and "same ranks as lora-dim64" in caps[1]


def test_size_budgets_are_checked_before_factoring(tiny_paths, everywhere, tmp_path, monkeypatch):
    lines = []
    calls = []
    monkeypatch.setattr(extract.pipeline, "iter_layers", lambda *args: calls.append(args) or iter(()))
    with pytest.raises(ConfigError, match="size: 1kb does not even hold"):
        _run(tiny_paths.single_file, everywhere[0], tmp_path / "small.safetensors", lines, dim=(16,), size="1kb")
    assert not calls
    monkeypatch.undo()
    _run(tiny_paths.single_file, everywhere[0], tmp_path / "big.safetensors", lines, dim=(16,), size="1GB")
    factoring = next(i for i, line in enumerate(lines) if line.startswith("factoring"))
    assert any(line.startswith("size 1GB: the rank cap --dim 16 comes first") for line in lines[:factoring]), lines


def test_swapped_base_and_tuned_are_refused_unless_allowed(tiny_paths, everywhere, tmp_path):
    lines = []
    with pytest.raises(InputError, match="swapped"):
        _run(everywhere[0], tiny_paths.single_file, tmp_path / "swap.safetensors", lines, dim=(4,))
    assert not lines
    _run(everywhere[0], tiny_paths.single_file, tmp_path / "swap.safetensors", lines, dim=(4,), allow_swapped=True)


def test_a_fixed_rank_with_a_capped_conv_is_tagged_with_its_rank(tiny_paths, everywhere, tmp_path):
    """conv_out (4 output channels) caps at rank 4 among rank-8 modules: still ss_network_dim 8, not 4 or Dynamic."""
    lines = []
    options = {"dim": (8,), "conv_dim": (8,), "extra_layers": True}
    (out,) = _run(tiny_paths.single_file, everywhere[0], tmp_path / "e8.safetensors", lines, **options).outputs
    lora = read_lora(out)
    assert sorted({module.rank for module in lora.modules.values()}) == [4, 8]
    assert lora.metadata["ss_network_dim"] == "8" and lora.metadata["ss_network_alpha"] == "8.0"
    assert any(line.startswith("e8: 1 of 219 layers") and "unet 1 at 4" in line for line in lines), lines


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (11,), ()])
def test_left_out_energy_is_taken_in_fp64_chunks_without_changing_it(monkeypatch, shape):
    """A token embedding is differenced a block at a time (no 2 GB of fp64 copies), to the one-shot value."""
    import extract.coverage

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()
    monkeypatch.setattr(extract.coverage, "CHUNK_ELEMENTS", 4)
    whole = float((a.double() - b.double()).square().sum())
    assert extract.coverage.squared_distance(a, b) == pytest.approx(whole, rel=1e-12)
