"""Every command of the README's ```bash blocks runs, on the tiny model, so the README cannot drift from the code.

The commands run in order, in a scratch project folder laid out as the README assumes: Makefile, pyproject.toml,
.venv, configs/ and concepts/ linked from the repository, models/sd_xl_base_1.0.safetensors = the tiny model,
datasets/emma = the demo dataset, with .venv/bin first on PATH (the README's `source .venv/bin/activate`). The
table HOW says how each command runs: as written, or (GPUs, the real model, hours) as a dry run or with few steps.
A README command that no row matches fails the test, and so does a row that no command uses.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_run import tiny_run_sections

REPO = Path(__file__).resolve().parents[2]
# one tiny finetune, then extractions, resizes, a grid: ~80 s of CPU in all
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")]
REAL_PRESET = "CONFIG=configs/finetune/a100-80gb.yaml"
TINY_PRESET = "CONFIG=tiny.yaml"  # 2 steps of the tiny model, written by the fixture

# (first words of a command, how it runs here, why). The first matching row decides.
HOW = [
    ("make demo", "make -n", "the whole chain on a fresh folder: make shows it; the workflow runs it for real"),
    ("make test", "make -n", "the test suite itself"),
    ("source .venv/bin/activate", "as written", "every command here runs with .venv/bin first on PATH"),
    ("xlbake dataset check", "tiny sizes", "the demo images are far below SDXL's sizes"),
    ("xlbake dataset", "as written", ""),
    (f"make finetune RUN=runs/emma {REAL_PRESET}", "tiny preset", "the one training of this test, shared by the rest"),
    ("make finetune", "make -n", "GPU presets: make reads them (finetune --dry-run) and shows what it would run"),
    ("make extract", "as written", ""),
    ("make resize", "as written", ""),
    ("python -m finetune", "as written", "a --dry-run"),
    ("python -m extract", "as written", ""),
    ("python -m resize", "as written", ""),
    ("xlbake grid", "tiny sizes", "a 64 px grid of 2 denoising steps"),
    ("xlbake fidelity", "tiny sizes", "2 samples of 8x8 latents"),
    ("accelerate launch", "dry run", "several GPUs: the finetune reads its config; the launch config must exist"),
    ("xlbake batch", "make -n", "a GPU pool: each concept's make runs with -n"),
]
TINY_SIZES = {  # added to the commands of these rows
    "xlbake dataset check": ["--min-pixels", "1024"],
    "xlbake grid": ["--steps", "2", "--width", "64", "--height", "64", "--cfg", "1", "--device", "cpu"],
    "xlbake fidelity": ["--samples", "2", "--latent-size", "8", "--device", "cpu"],
}


def readme_commands() -> list[list[str]]:
    """Every command line of the README's bash blocks as words: continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def row_of(words: list[str]) -> int:
    """The index of the HOW row that decides how the command runs."""
    for index, (start, _, _) in enumerate(HOW):
        if words[: len(start.split())] == start.split():
            return index
    pytest.fail(f"README command not covered by the table HOW in {__file__}: {shlex.join(words)}")


def as_run_here(words: list[str], row: int, project: Path) -> list[str]:
    """The command as this test runs it (see HOW)."""
    start, how, _ = HOW[row]
    if how == "make -n":
        return ["make", "-n", *words[1:]] if words[0] == "make" else [*words, "--make-arg=-n"]
    if how == "tiny preset":
        return [TINY_PRESET if word == REAL_PRESET else word for word in words]
    if how == "tiny sizes":
        return [*words, *TINY_SIZES[start]]
    if how == "dry run":
        launch_config = words[words.index("--config_file") + 1]
        assert (project / launch_config).is_file(), f"{launch_config}: no such accelerate config"
        return ["python", *words[words.index("-m") :], "--dry-run"]
    assert how == "as written", how
    return words


@pytest.fixture
def project(tmp_path, tiny_paths, demo_dataset):
    """A project folder as the README assumes it, with the tiny model and the demo data in the real ones' places."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml", ".venv", "configs", "concepts"):
        (folder / name).symlink_to(REPO / name)
    (folder / "models").mkdir()
    (folder / "models" / "sd_xl_base_1.0.safetensors").symlink_to(tiny_paths.single_file)
    (folder / "datasets").mkdir()
    (folder / "datasets" / "emma").symlink_to(demo_dataset)
    (folder / "prompts.txt").write_text("a photo of xlbk emblem\n")
    tiny = tiny_run_sections(tiny_paths, demo_dataset, folder / "runs" / "finetune")
    tiny["model"]["base"] = "models/sd_xl_base_1.0.safetensors"
    tiny |= {
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 2},
        "precision": {"mixed": "no"},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    (folder / TINY_PRESET.removeprefix("CONFIG=")).write_text(yaml.safe_dump(tiny))
    return folder


def test_every_readme_command_runs(project, tmp_path):
    bin_dir = tmp_path / "bin"  # `make` that never reinstalls the shared .venv
    bin_dir.mkdir()
    (bin_dir / "make").write_text(f'#!/bin/sh\nexec {shutil.which("make")} -o .venv/.installed "$@"\n')
    (bin_dir / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "VIRTUAL_ENV")}
    env |= {"PATH": f"{bin_dir}:{REPO / '.venv' / 'bin'}:{env['PATH']}", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    used, tuned, trained = set(), project / "runs" / "emma" / "tuned.fp32.safetensors", None
    for words in readme_commands():
        used.add(index := row_of(words))
        command = as_run_here(words, index, project)
        result = subprocess.run(["bash", "-c", shlex.join(command)], cwd=project, env=env, capture_output=True,
                                text=True, check=False)  # fmt: skip
        assert result.returncode == 0, f"README: {shlex.join(words)}\nran: {shlex.join(command)}\n{result.stderr}"
        if words[:2] == ["make", "finetune"] and HOW[index][1] == "tiny preset":
            trained = tuned.stat().st_mtime_ns
    assert not [row for i, row in enumerate(HOW) if i not in used], "rows of HOW that no README command uses"
    assert tuned.stat().st_mtime_ns == trained, "a later README command retrained the finetune"
    made = {p.name for p in project.glob("*.safetensors")} | {p.name for p in (project / "runs" / "emma").iterdir()}
    expected = {"lora-dim128-rank16.safetensors", "lora-dim128-rank32.safetensors", "emma-dim16.safetensors"}
    expected |= {"emma-100mb.safetensors", "emma-r8.safetensors", "emma-fro90.safetensors"}
    assert expected <= made and (project / "grid.png").is_file()
    assert not (project / "runs" / "emma-ema").exists(), "make -n created a run folder"
