"""``python -m resize`` / ``xlbake resize``: options, config file, one-line errors with exit 1, and the equivalence
of resizing an extracted LoRA with extracting at the lower rank directly."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from resize import cli as resize_cli
from resize.config import ResizeConfig
from xlbake import cli
from xlbake.config import describe, load_config
from xlbake.lora.io import read_lora

REPO = Path(__file__).resolve().parents[2]
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SHIPPED_CONFIG = REPO / "configs" / "resize.yaml"
LINEAR = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
CONV3 = "lora_unet_input_blocks_1_0_in_layers_2"


@pytest.fixture(autouse=True)
def restore_logging():
    """The command sets up logging on the root logger; put it back for the other tests."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


@pytest.fixture
def lora(tmp_path) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"{LINEAR}.lora_up.weight": torch.randn(24, 8, generator=gen),
        f"{LINEAR}.lora_down.weight": torch.randn(8, 16, generator=gen),
        f"{LINEAR}.alpha": torch.tensor(4.0),
        f"{CONV3}.lora_up.weight": torch.randn(12, 8, 1, 1, generator=gen),
        f"{CONV3}.lora_down.weight": torch.randn(8, 10, 3, 3, generator=gen),
        f"{CONV3}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "8"})
    return path


def invoke(*args: object):
    return CliRunner().invoke(resize_cli.main, [str(a) for a in args])


def test_writes_one_file_per_rank_and_prints_a_summary(tmp_path, lora):
    result = invoke("--lora", lora, "--rank", "2,4", "--conv-rank", "3", "--out", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.output
    for rank in (2, 4):
        out = tmp_path / f"o-r{rank}.safetensors"
        assert f"wrote {out}" in result.stdout
        modules = read_lora(out).modules
        assert (modules[LINEAR].rank, modules[CONV3].rank) == (rank, 3)
        assert (tmp_path / f"o-r{rank}.report.json").is_file()
    assert "kept energy" in result.stdout and "unet" in result.stdout
    assert "covered:" not in result.stdout  # the input does not say what it covers of a finetune


def test_umbrella_command_config_file_and_overrides(tmp_path, lora):
    config = tmp_path / "r.yaml"
    config.write_text(f"lora: {lora.name}\nrank: [6]\nsave_precision: bf16\nreport: false\n")
    out = tmp_path / "u.safetensors"
    args = ["resize", "--config", config, "--out", out, "--set", "rank=[2]", "--method", "sv_fro", "--value", "0.5"]
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    written = read_lora(out)  # the lora path in the file is relative to the file's folder
    assert {m.up.dtype for m in written.modules.values()} == {torch.bfloat16}
    assert max(m.rank for m in written.modules.values()) <= 2  # --set beats the file, sv_fro caps at it
    assert not (tmp_path / "u.report.json").exists()


def test_flags_win_over_set_which_wins_over_the_config_file(tmp_path, lora):
    """The rule of every stage (docs/architecture.md): a flag beats ``--set``, which beats the config file; the
    Makefile's --rank/--out thus decide the file even when RESIZE_ARGS holds a --set."""
    config = tmp_path / "r.yaml"
    config.write_text("rank: [6]\nsave_precision: bf16\nalpha: 3\n")
    out = tmp_path / "o.safetensors"
    overrides = ("--set", "rank=[4]", "--set", "save_precision=fp32")
    result = invoke("--config", config, *overrides, "--rank", "2", "--lora", lora, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert (resolved["rank"], resolved["save_precision"], resolved["alpha"]) == ([2], "fp32", 3.0)


def test_dry_run_prints_the_resolved_config(tmp_path, lora):
    result = invoke("--lora", lora, "--out", tmp_path / "o.safetensors", "--size", "1MB,2MB", "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["size"] == ["1MB", "2MB"] and resolved["lora"] == str(lora)
    assert not list(tmp_path.glob("o*"))


def test_shipped_config_loads_and_every_option_is_documented():
    cfg = load_config(ResizeConfig, SHIPPED_CONFIG)
    assert cfg.rank == (16,) and cfg.method == "fixed"
    docs = describe(ResizeConfig)
    assert all(doc.doc for doc in docs), [doc.key for doc in docs if not doc.doc]
    assert set(yaml.safe_load(SHIPPED_CONFIG.read_text())) == {doc.key for doc in docs}


def _not_a_lora(tmp_path: Path) -> Path:
    save_file({"model.diffusion_model.out.2.weight": torch.ones(4, 4)}, str(tmp_path / "ckpt.safetensors"))
    return tmp_path / "ckpt.safetensors"


def _loha(tmp_path: Path) -> Path:
    tensors = {f"{LINEAR}.hada_w1_a": torch.ones(4, 2), f"{LINEAR}.hada_w1_b": torch.ones(2, 4)}
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    return tmp_path / "loha.safetensors"


def _pickle(tmp_path: Path) -> Path:
    torch.save({"x": torch.ones(1)}, tmp_path / "lora.pt")
    return tmp_path / "lora.pt"


BAD = {
    "not a LoRA": (_not_a_lora, ["--rank", "4"], "not a LoRA"),
    "LoHa": (_loha, ["--rank", "4"], "LoHa"),
    "pickle": (_pickle, ["--rank", "4"], "pickle"),
    "rank 0": (None, ["--rank", "0"], "positive"),
    "negative rank": (None, ["--rank", "-4"], "positive"),
    "negative conv rank": (None, ["--rank", "4", "--conv-rank=-1"], "positive"),
    "rank not a number": (None, ["--rank", "four"], "--rank: 'four' is not a rank"),
    "ranks not numbers": (None, ["--rank", "8,x"], "--rank: 'x' is not a rank"),
    "no rank": (None, [], "rank: missing"),
    "unknown method": (None, ["--method", "sv_frob", "--value", "0.9"], "did you mean"),
    "missing file": (lambda tmp: tmp / "nope.safetensors", ["--rank", "4"], "no such file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, lora, case):
    make, args, message = BAD[case]
    source = make(tmp_path) if make else lora
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("--lora", source, "--out", tmp_path / "o.safetensors", *args)
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr
    assert message in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_is_kept_without_force(tmp_path, lora):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    result = invoke("--lora", lora, "--rank", "2", "--out", out)
    assert result.exit_code == 1 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert out.read_bytes() == b"precious"
    assert invoke("--lora", lora, "--rank", "2", "--out", out, "--force", "--no-report").exit_code == 0
    assert read_lora(out).modules[LINEAR].rank == 2


@pytest.mark.slow
def test_python_dash_m_resize(tmp_path, lora):
    out = tmp_path / "m.safetensors"
    run = [sys.executable, "-m", "resize", "--lora", str(lora), "--rank", "3", "--out", str(out), "--no-report"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=REPO, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr
    assert read_lora(out).modules[LINEAR].rank == 3
    bad = [*run[:6], "0", *run[7:]]  # --rank 0
    refused = subprocess.run(bad, capture_output=True, text=True, timeout=300, cwd=REPO, env=ONE_THREAD_ENV)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "positive" in refused.stderr


def _tuned_copy(base: Path, out: Path) -> Path:
    """The tiny base with every weight matrix and kernel changed (a stand-in for a finetune)."""
    gen = torch.Generator().manual_seed(1)
    tensors = load_file(str(base))
    for key, tensor in tensors.items():
        if tensor.dim() >= 2 and tensor.is_floating_point():
            tensors[key] = tensor + 0.05 * torch.randn(tensor.shape, generator=gen).to(tensor.dtype)
    save_file(tensors, str(out))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "extract" / "cli.py").exists(), reason="extract/cli.py is not built yet")
def test_resizing_an_extracted_lora_equals_extracting_at_the_lower_rank(tmp_path, tiny_paths):
    """The guide's observation, exactly: resize(extract at dim 128, 16) == extract at dim 16 (no clamping)."""
    tuned = _tuned_copy(tiny_paths.single_file, tmp_path / "tuned.safetensors")

    # One extract run writes both ranks from one exact SVD per layer, exactly as two runs would (saves a process).
    args = ["--base", tiny_paths.single_file, "--tuned", tuned, "--dim", "16,128", "--conv-dim", "16,128"]
    args += ["--svd", "exact", "--clamp-quantile", "1", "--save-precision", "fp32", "--out", tmp_path / "e.safetensors"]
    done = subprocess.run(
        [sys.executable, "-m", "extract", *map(str, args)],
        **{"capture_output": True, "text": True, "timeout": 600, "cwd": REPO, "env": ONE_THREAD_ENV},
    )
    assert done.returncode == 0, done.stderr
    [big] = tmp_path.glob("e-dim128*.safetensors")
    [direct] = tmp_path.glob("e-dim16*.safetensors")
    resized = tmp_path / "d128-r16.safetensors"
    result = invoke("--lora", big, "--rank", "16", "--save-precision", "fp32", "--out", resized, "--no-report")
    assert result.exit_code == 0, result.output
    ours, theirs = read_lora(resized).modules, read_lora(direct).modules
    assert set(ours) == set(theirs) and ours
    for name, module in theirs.items():
        assert ours[name].rank == module.rank, name
        expected = module.delta().double()
        error = float((ours[name].delta().double() - expected).norm() / expected.norm().clamp_min(1e-30))
        assert error < 1e-4, name
