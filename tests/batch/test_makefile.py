"""The Makefile reruns exactly what changed.

Most tests run the real Makefile against a fake venv: its ``bin/python`` answers ``-m finetune/extract/resize``
with fast fakes that record each call (everything else, e.g. ``-m xlbake.batch.concepts``, goes to the real
interpreter), so make's decisions are tested in seconds. The fake ``finetune --dry-run`` prints the preset's text
and the overrides, so any change of them changes the "resolved config". The real tiny chain through this Makefile
(then ``make -q``: nothing left to do) is the slow test in ``test_batch.py``.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from fake_make import Make

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

CHAIN = ("finetune", "extract", "resize")


@pytest.fixture
def make(tmp_path):
    return Make(tmp_path)


@pytest.fixture
def concept(tmp_path):
    """A concept file with a dataset folder and its own preset file (the fake finetune prints the preset)."""
    (tmp_path / "data" / "2_kafka woman").mkdir(parents=True)
    (tmp_path / "data" / "2_kafka woman" / "001.txt").write_text("kafka, a woman")
    (tmp_path / "preset.yaml").write_text("train: {epochs: 3}\n")
    path = tmp_path / "concepts" / "kafka.yaml"
    path.parent.mkdir()
    write_concept(path)
    return path


def write_concept(path: Path, **changes: str) -> None:
    keys = {"datasets": "[../data]", "preset": "../preset.yaml", "overrides": "[train.epochs=2]", "dim": "[32]"}
    keys |= {"rank": "[8]", **changes}
    path.write_text("".join(f"{key}: {value}\n" for key, value in keys.items()))


def test_a_finished_chain_is_not_rerun(make, concept):
    make(*CHAIN, f"CONCEPT={concept}")
    assert make.calls() == ["finetune --force", "extract 32", "resize 32->8"]
    run = make.runs / "kafka"
    assert {p.name for p in run.glob("*.safetensors")} == {
        "tuned.fp32.safetensors", "lora-dim32.safetensors", "lora-dim32-rank8.safetensors"
    }  # fmt: skip
    assert make("-q", *CHAIN, f"CONCEPT={concept}", check=False).returncode == 0
    make(*CHAIN, f"CONCEPT={concept}")
    assert make.calls() == []


def test_another_rank_reruns_only_its_stage(make, concept):
    make(*CHAIN, f"CONCEPT={concept}")
    make.calls()
    dry = make("-n", "extract", f"CONCEPT={concept}", "DIM=64").stdout
    assert "--dim 64" in dry and "-m finetune " not in dry and "--dim 32" not in dry
    make("extract", f"CONCEPT={concept}", "DIM=64")
    assert make.calls() == ["extract 64"]
    make("resize", f"CONCEPT={concept}", "RANK=4,8", "SIZE=1MB")
    assert make.calls() == ["resize 32->4", "resize 32->1MB"]
    make("resize", f"CONCEPT={concept}", "DIM=32 64")
    assert make.calls() == ["resize 64->8"]
    assert (make.runs / "kafka" / "lora-dim32.safetensors").read_text() == "extract"


def test_only_real_changes_of_the_resolved_config_rerun(make, concept, tmp_path):
    make(*CHAIN, f"CONCEPT={concept}")
    make.calls()
    os.utime(concept, None)  # touched, same content
    make(*CHAIN, f"CONCEPT={concept}")
    assert make.calls() == []
    write_concept(concept, rank="[8, 16]")  # only the resize targets change
    make(*CHAIN, f"CONCEPT={concept}")
    assert make.calls() == ["resize 32->16"]
    write_concept(concept, rank="[8, 16]", conv_dim="4")  # extraction options: extract and resize again
    make(*CHAIN, f"CONCEPT={concept}")
    assert make.calls() == ["extract 32", "resize 32->8", "resize 32->16"]
    (tmp_path / "preset.yaml").write_text("train: {epochs: 4}\n")  # the preset the concept names changed
    refused = make(*CHAIN, f"CONCEPT={concept}", check=False)  # a finished run is retrained only with FORCE=1
    assert refused.returncode == 2 and "preset: train: {epochs: 3}" in refused.stderr and make.calls() == []
    make(*CHAIN, f"CONCEPT={concept}", "FORCE=1")
    assert make.calls() == ["finetune --force", "extract 32", "resize 32->8", "resize 32->16"]
    make("finetune", f"CONCEPT={concept}", "SET=optim.unet_lr=1e-5", "FORCE=1")  # a command-line override too
    assert make.calls() == ["finetune --force"]


def test_a_changed_dataset_reruns_the_finetune(make, concept, tmp_path):
    make(*CHAIN, f"CONCEPT={concept}")
    make.calls()
    (tmp_path / "data" / "2_kafka woman" / "002.txt").write_text("kafka, smiling")
    refused = make("-q", "finetune", f"CONCEPT={concept}", check=False)
    assert refused.returncode == 2 and f"dataset {tmp_path / 'data'} changed" in refused.stderr
    assert make("-q", "finetune", f"CONCEPT={concept}", "FORCE=1", check=False).returncode == 1
    make(*CHAIN, f"CONCEPT={concept}", "FORCE=1")
    assert make.calls() == ["finetune --force", "extract 32", "resize 32->8"]


def test_an_interrupted_finetune_resumes_and_is_started_over_only_with_force(make, concept):
    failed = make("finetune", f"CONCEPT={concept}", check=False, fail="finetune")
    assert failed.returncode != 0 and "Error: interrupted" in failed.stderr
    make("finetune", f"CONCEPT={concept}", check=False, fail="finetune")
    make("finetune", f"CONCEPT={concept}")
    assert make.calls() == ["finetune --force", "finetune --resume auto", "finetune --resume auto"]
    write_concept(concept, overrides="[train.epochs=3]")
    make("finetune", f"CONCEPT={concept}", "FORCE=1", check=False, fail="finetune")
    write_concept(concept, overrides="[train.epochs=4]")
    refused = make("finetune", f"CONCEPT={concept}", check=False)  # its saved state is not thrown away either
    assert refused.returncode == 2 and "a started finetune" in refused.stderr
    make("finetune", f"CONCEPT={concept}", "FORCE=1")
    assert make.calls() == ["finetune --force", "finetune --force"]


def test_a_failed_extraction_leaves_the_finetune_done(make, concept):
    assert make(*CHAIN, f"CONCEPT={concept}", check=False, fail="extract").returncode != 0
    assert make.calls() == ["finetune --force", "extract 32"]
    make(*CHAIN, f"CONCEPT={concept}")
    assert make.calls() == ["extract 32", "resize 32->8"]


def test_a_bad_concept_stops_make_with_its_message(make, concept):
    write_concept(concept, preset="nope")
    result = make("finetune", f"CONCEPT={concept}", check=False)
    assert result.returncode == 2 and make.calls() == []
    assert "preset:" in result.stderr and "the concept cannot be used" in result.stderr


def test_plain_run_and_demo_target(make, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("train: {epochs: 1}\n")
    out = make("demo", f"CONFIG={config}", "DIM=16", "RANK=4").stdout
    assert make.calls() == ["finetune --force", "extract 16", "resize 16->4"]
    assert f"Demo outputs in {make.runs}/demo/" in out and "lora-dim16-rank4.safetensors" in out


def tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its mtime and content, to check that a command changed nothing."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def own_run(make, tmp_path):
    """A finished plain run made with its own config and an override (the README's step 2), stage calls cleared."""
    config = tmp_path / "mine.yaml"
    config.write_text("train: {epochs: 9}\n")
    run = make.runs / "emma"
    make("finetune", f"RUN={run}", f"CONFIG={config}", "SET=train.epochs=2 data.roots=[data]")
    assert make.calls() == ["finetune --force"]
    return run


def test_later_stages_use_the_runs_own_config_and_never_retrain(make, own_run):
    make("extract", f"RUN={own_run}", "DIM=16")  # the README's step 3: no CONFIG, so not the default preset
    assert make.calls() == ["extract 16"]
    make("resize", f"RUN={own_run}", "DIM=16", "RANK=4")
    make("finetune", "extract", "resize", f"RUN={own_run}", "DIM=16", "RANK=4")
    assert make.calls() == ["resize 16->4"]
    assert make("-q", "finetune", f"RUN={own_run}", check=False).returncode == 0


def test_dry_runs_change_nothing(make, own_run, tmp_path):
    before = tree(make.runs)
    dry = make("-n", "finetune", f"RUN={own_run}", "SET=train.epochs=3", "FORCE=1").stdout
    assert "-m finetune" in dry and "--force" in dry
    assert make("-q", "finetune", f"RUN={own_run}", "SET=train.epochs=3", "FORCE=1", check=False).returncode == 1
    assert make("-n", "extract", f"RUN={own_run}", "DIM=16").stdout.count("-m extract") == 1
    assert make("-n", "finetune", f"RUN={make.runs / 'fresh'}").returncode == 0
    assert tree(make.runs) == before and not (make.runs / "fresh").exists()
    make("extract", f"RUN={own_run}", "DIM=16")
    assert make.calls() == ["extract 16"]


def test_extract_without_a_finetune_stops_and_says_what_to_run(make):
    result = make("extract", f"RUN={make.runs / 'new'}", check=False)
    assert result.returncode == 2 and make.calls() == []
    assert "run the finetune first" in result.stderr and "make finetune" in result.stderr
    assert not (make.runs / "new").exists()


def test_a_finished_run_is_retrained_only_with_force(make, own_run, tmp_path):
    refused = make("finetune", f"RUN={own_run}", "SET=train.epochs=3", check=False)
    assert refused.returncode == 2 and make.calls() == []
    assert "FORCE=1" in refused.stderr and "sets.train.epochs: 2 -> 3" in refused.stderr
    other = tmp_path / "other.yaml"
    other.write_text("train: {epochs: 1}\n")
    refused = make("extract", f"RUN={own_run}", f"CONFIG={other}", "DIM=16", check=False)  # not the run's config
    assert refused.returncode == 2 and make.calls() == [] and "preset" in refused.stderr
    make("finetune", "extract", f"RUN={own_run}", "SET=train.epochs=3", "DIM=16", "FORCE=1")
    assert make.calls() == ["finetune --force", "extract 16"]
    make("extract", f"RUN={own_run}", "DIM=16")
    assert make.calls() == []


def test_make_demo_on_a_fresh_clone_installs_then_runs_the_chain(make, tmp_path):
    fresh = tmp_path / "fresh-venv"  # no venv while the Makefile is read: the recipes decide
    out = make("demo", f"VENV={fresh}", f"PYTHON={make.venv / 'bin' / 'python'}").stdout
    assert (fresh / ".installed").exists() and f"Demo outputs in {make.runs}/demo/" in out
    assert make.calls() == ["finetune --force", "extract 128", "resize 128->16"]
    make("demo", f"VENV={fresh}")
    assert make.calls() == []


@pytest.mark.parametrize("setting", ["RANK=abc", "RANK=8,x", "DIM=64k", "CONV_DIM=-1"])
def test_a_bad_rank_fails_while_the_makefile_is_read_before_any_stage(make, setting):
    result = make("demo", setting, check=False)
    assert result.returncode != 0
    assert f"{setting.split('=')[0]}=" in result.stderr and "whole numbers" in result.stderr, result.stderr
    assert make.calls() == []


def write_checkpoint(path: Path, dtype: str) -> None:
    """A one-tensor safetensors file stored in ``dtype`` (what finetune.epochs reads of a checkpoint)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros(2, dtype=dtype)}, str(path))


def test_extract_epochs_makes_a_lora_per_fp32_checkpoint_and_reruns_only_what_is_missing(make, own_run, tmp_path):
    folder = own_run / "checkpoints"
    write_checkpoint(folder / "epoch-0001.safetensors", "float16")
    write_checkpoint(folder / "epoch-0001.fp32.safetensors", "float32")  # checkpoint.keep_fp32
    write_checkpoint(folder / "epoch-0002.safetensors", "float32")  # checkpoint.dtype: fp32
    write_checkpoint(folder / "step-00000003.safetensors", "float16")  # no fp32 copy: left out, with a note
    result = make("extract-epochs", f"RUN={own_run}", "DIM=16")
    assert "no fp32 copy of step-00000003" in result.stderr
    tuned = [json.loads(line)["tuned"] for line in make.log.read_text().splitlines()[-2:]]
    assert make.calls() == ["extract 16", "extract 16"]
    assert tuned == [str(folder / "epoch-0001.fp32.safetensors"), str(folder / "epoch-0002.safetensors")]
    assert sorted(p.name for p in (own_run / "epochs").iterdir()) == [
        "lora-epoch-0001-dim16.safetensors",
        "lora-epoch-0002-dim16.safetensors",
    ]
    (own_run / "epochs" / "lora-epoch-0002-dim16.safetensors").unlink()
    make("extract-epochs", f"RUN={own_run}", "DIM=16")
    assert make.calls() == ["extract 16"]

    refused = make("grid-epochs", f"RUN={own_run}", "DIM=16", check=False)
    assert refused.returncode != 0 and "give PROMPTS=file" in refused.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("xlbk emblem --n blurry\n")
    dry = make("-n", "grid-epochs", f"RUN={own_run}", "DIM=16", f"PROMPTS={prompts}").stdout
    assert "xlbake grid" in dry and f"--prompts-file {prompts}" in dry and "grid-dim16.png" in dry
    assert dry.count("--lora ") == 2 and make.calls() == []


def test_extract_epochs_without_fp32_checkpoints_says_what_to_set(make, own_run):
    write_checkpoint(own_run / "checkpoints" / "epoch-0001.safetensors", "float16")
    result = make("extract-epochs", f"RUN={own_run}", check=False)
    assert result.returncode == 2 and "checkpoint.keep_fp32: true" in result.stderr and make.calls() == []
