"""Concept YAMLs: loading, every problem in one message, finetune arguments, make variables, stage stamps."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from xlbake.batch.concepts import (
    PRESETS_DIR,
    cli,
    concept_path,
    dataset_digest,
    list_concepts,
    load_concept,
    stamp_text,
    write_if_changed,
)
from xlbake.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def concept_dir(tmp_path):
    """concepts/ beside a dataset folder and a preset file."""
    (tmp_path / "data" / "kafka" / "2_kafka woman").mkdir(parents=True)
    write(tmp_path / "presets" / "mine.yaml", "train: {epochs: 3}\n")
    return tmp_path / "concepts"


def test_load_concept_resolves_paths_and_builds_finetune_args(concept_dir):
    write(
        concept_dir / "kafka.yaml",
        "datasets: [../data/kafka]\npreset: ../presets/mine.yaml\ntriggers: [kafka, 'kafka woman']\n"
        "add_triggers: true\noverrides: [train.epochs=50, 'optim.unet_lr=2e-6']\ndim: [32, 64]\nrank: 8\n",
    )
    concept = load_concept("kafka", concept_dir)
    data = concept_dir.parent / "data" / "kafka"
    assert concept.name == "kafka"
    assert concept.config.datasets == (data,)
    assert concept.config.dim == (32, 64) and concept.config.rank == (8,)
    assert concept.preset == concept_dir.parent / "presets" / "mine.yaml"
    assert concept.finetune_args() == [
        "--config", str(concept.preset),
        "--set", f'data.roots=["{data}"]',
        "--set", 'data.triggers=["kafka", "kafka woman"]',
        "--set", 'caption.prefix="kafka, kafka woman,"',
        "--set", "train.epochs=50",
        "--set", "optim.unet_lr=2e-6",
    ]  # fmt: skip


def test_preset_by_name_and_concept_by_path(tmp_path):
    (tmp_path / "d").mkdir()
    path = write(tmp_path / "x.yml", "datasets: [d]\npreset: tiny-cpu\n")
    concept = load_concept(str(path))
    assert concept.preset == PRESETS_DIR / "tiny-cpu.yaml" and concept.preset.is_file()
    assert concept.name == "x" and concept.config.dim == (128,) and concept.config.rank == (16,)
    assert concept_path("kafka", Path("cs")) == Path("cs/kafka.yaml")
    assert concept_path("other/kafka.yaml", Path("cs")) == Path("other/kafka.yaml")


def test_unknown_keys_and_types_in_one_message(concept_dir):
    path = write(concept_dir / "bad.yaml", "datasets: [a]\npreset: mine\ntrigers: [x]\ndim: [big]\nconv_dim: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_concept(path)
    text = str(err.value)
    assert text.startswith("3 config problems:")
    assert "bad.yaml:3: trigers: unknown key; did you mean 'triggers'?" in text
    assert "bad.yaml:4: dim[0]:" in text and "bad.yaml:5: conv_dim:" in text


def test_every_value_problem_in_one_message(concept_dir):
    path = write(
        concept_dir / "bad.yaml",
        "datasets: []\npreset: mine\noverrides: [train.epochs, run_dir=/tmp/x]\ndim: [0]\n"
        "size: [100 MB]\nextract_args: [--out=x.safetensors]\nadd_triggers: true\n",
    )
    with pytest.raises(ConfigError) as err:
        load_concept(path)
    text = str(err.value)
    assert "add_triggers: needs at least one word in triggers" in text
    assert "datasets: give at least one dataset folder" in text
    assert "overrides[0]: expected KEY=VALUE" in text
    assert "overrides[1]: run_dir is set by the chain" in text
    assert "dim, rank: ranks must be >= 1" in text
    assert "size: '100 MB' is not a budget" in text
    assert "extract_args: '--out' is set by the chain" in text


def test_missing_folders_and_preset_are_named_together(concept_dir):
    path = write(concept_dir / "kafka.yaml", "datasets: [../data/kafka, ../data/nope]\npreset: a100-80gbb\n")
    with pytest.raises(ConfigError) as err:
        load_concept(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert "datasets[1]:" in lines[0] and "data/nope is not a folder" in lines[0]
    assert "preset:" in lines[1] and "a100-80gbb.yaml does not exist" in lines[1] and "a100-80gb" in lines[1]


def test_missing_required_keys_and_unknown_concept(concept_dir):
    path = write(concept_dir / "empty.yaml", "triggers: [x]\n")
    with pytest.raises(ConfigError, match=r"datasets: missing required key[\s\S]*preset: missing required key"):
        load_concept(path)
    with pytest.raises(ConfigError, match=r"concepts/nope.yaml: no such concept file; concepts in .*: empty"):
        load_concept("nope", concept_dir)
    bad_name = write(concept_dir / "my concept.yaml", "datasets: [builtin:demo]\npreset: tiny-cpu\n")
    with pytest.raises(ConfigError, match="the name 'my concept' must be"):
        load_concept(bad_name)


def test_shipped_concepts_load():
    paths = list_concepts(REPO / "concepts")
    assert REPO / "concepts" / "example.yaml" in paths
    for path in paths:
        concept = load_concept(path)
        assert concept.preset.is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_vars_survive_make_and_shell_quoting(concept_dir, tmp_path):
    """Trigger words with $, #, quotes and spaces reach the finetune command exactly as written."""
    write(
        concept_dir / "odd.yaml",
        'datasets: [builtin:demo]\npreset: tiny-cpu\ntriggers: ["it\'s $HOME #1"]\nadd_triggers: true\n'
        "overrides: ['caption.suffix=a b']\nrank: [4, 8]\nsize: [1MB]\n",
    )
    concept = load_concept("odd", concept_dir)
    fragment = write(tmp_path / "odd.mk", concept.make_vars())
    makefile = write(
        tmp_path / "Makefile",
        f"include {fragment}\nshow:\n\t@printf '%s\\n' $(CONCEPT_FINETUNE_ARGS)\n\t@echo 'RANK=$(RANK) SIZE=$(SIZE)'\n",
    )
    out = subprocess.run(["make", "-s", "-f", str(makefile), "show"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [*concept.finetune_args(), "RANK=4 8 SIZE=1MB"]
    assert 'caption.prefix="it\'s $HOME #1,"' in out.stdout


def test_dataset_digest_follows_files(tmp_path):
    root = tmp_path / "ds"
    write(root / "2_x" / "a.txt", "a caption")
    first = dataset_digest([root])
    assert dataset_digest([root]) == first
    write(root / "2_x" / "b.png", "image")
    second = dataset_digest([root])
    assert second != first and "2 files" in second[0]
    (root / "2_x" / "b.png").unlink()
    os.utime(root / "2_x" / "a.txt", ns=(1, 1))
    assert dataset_digest([root]) not in (first, second)
    assert dataset_digest([tmp_path / "gone"]) == [f"# dataset {tmp_path / 'gone'}: missing"]


def test_stamp_text_appends_dataset_lines(tmp_path):
    write(tmp_path / "ds" / "a.txt", "x")
    text = stamp_text(f"run_dir: r\ndata:\n  roots:\n  - {tmp_path / 'ds'}\n  dataset_toml: null\n")
    assert text.startswith("run_dir: r\n") and f"# dataset {tmp_path / 'ds'}: 1 files, sha256 " in text
    with pytest.raises(ConfigError, match="not YAML"):
        stamp_text("a: [")


def test_write_if_changed_keeps_the_mtime_of_an_unchanged_file(tmp_path):
    path = tmp_path / "stamp"
    assert write_if_changed(path, "a\n")
    os.utime(path, ns=(10**9, 10**9))
    assert not write_if_changed(path, "a\n")
    assert path.stat().st_mtime_ns == 10**9
    assert write_if_changed(path, "b\n") and path.stat().st_mtime_ns > 10**9


def test_stamp_command_writes_only_on_change_and_passes_failures_through(tmp_path):
    stamp = tmp_path / "run" / ".finetune.config"
    printer = [sys.executable, "-c", "print('train: {epochs: 2}')"]
    runner = CliRunner()
    result = runner.invoke(cli, ["stamp", str(stamp), "--", *printer])
    assert result.exit_code == 0, result.output
    assert stamp.read_text().startswith("train: {epochs: 2}\n")
    os.utime(stamp, ns=(10**9, 10**9))
    assert runner.invoke(cli, ["stamp", str(stamp), "--", *printer]).exit_code == 0
    assert stamp.stat().st_mtime_ns == 10**9
    failing = runner.invoke(cli, ["stamp", str(stamp), "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert failing.exit_code == 3 and stamp.stat().st_mtime_ns == 10**9


def test_make_vars_command_reports_a_bad_concept(concept_dir, tmp_path):
    write(concept_dir / "bad.yaml", "datasets: [../data/kafka]\npreset: mine\n")
    result = CliRunner().invoke(cli, ["make-vars", str(concept_dir / "bad.yaml"), "--out", str(tmp_path / "x.mk")])
    assert result.exit_code == 1 and "preset:" in result.output and not (tmp_path / "x.mk").exists()
