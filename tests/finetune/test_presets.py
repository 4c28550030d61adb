"""Every shipped finetune preset loads and passes the memory planner on the GPU it is made for; every accelerate
launch config loads with accelerate's own reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from finetune.config import FinetuneConfig
from finetune.launch import read_accelerate_config
from finetune.planner.plan import plan
from finetune.planner.report import parse_gib
from xlbake.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "finetune"
LAUNCH = ROOT / "configs" / "accelerate"
TARGETS = {
    "a100-80gb.yaml": ("80GB", None),
    "a100-80gb-ema.yaml": ("80GB", None),
    "a6000-48gb.yaml": ("48GB", None),
    "24gb.yaml": ("24GB", "deepspeed-zero2.yaml"),
    "multi-gpu.yaml": ("80GB", "multi-gpu.yaml"),
    "tiny-cpu.yaml": ("4GB", None),  # trains on the CPU: planned against a small memory budget
}
"""Preset -> (GPU memory it is made for, accelerate launch config it is run with)."""
OURS = ("a6000-48gb.yaml", "24gb.yaml", "multi-gpu.yaml")
"""Presets made from the planner: they must fit with headroom, not just squeeze in."""
NO_DEEPSPEED_24GB = (
    "optim.te1_lr=0", "optim.te2_lr=0", "precision.mixed=bf16", "precision.full_bf16=true", "optim.name=adafactor",
    "optim.unet_lr=1e-5",
)  # fmt: skip
"""The 24 GB alternative without DeepSpeed that 24gb.yaml's comments offer."""


def test_every_preset_has_a_target():
    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == sorted(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_preset_passes_the_planner_for_its_gpu(name):
    memory, launch = TARGETS[name]
    cfg = load_config(FinetuneConfig, PRESETS / name)
    gpus, deepspeed = read_accelerate_config(LAUNCH / launch) if launch else (1, None)
    result = plan(cfg, gpu_memory_bytes=parse_gib(memory), gpus=gpus, deepspeed=deepspeed, suggest=False)
    assert result.verdict != "does not fit", f"{name}: {result.gpu_total / 2**30:.1f} GiB on {memory}"
    if name in OURS:
        assert result.verdict == "fits"


def test_24gb_alternative_without_deepspeed_fits_and_is_documented():
    text = (PRESETS / "24gb.yaml").read_text()
    documented = re.findall(r"--set (\S+)", text)
    assert list(NO_DEEPSPEED_24GB) == [s for s in documented if s in NO_DEEPSPEED_24GB]
    cfg = load_config(FinetuneConfig, PRESETS / "24gb.yaml", NO_DEEPSPEED_24GB)
    assert plan(cfg, gpu_memory_bytes=parse_gib("24GB"), suggest=False).verdict == "fits"


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.yaml")), ids=lambda p: p.name)
def test_launch_config_loads_and_its_examples_name_real_files(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    for example in re.findall(r"configs/\S+\.yaml", path.read_text()):
        assert (ROOT / example).is_file(), f"{path.name} names {example}"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_run_line_names_its_own_preset(name):
    runs = re.findall(r"^# Run: .*?configs/finetune/(\S+\.yaml)", (PRESETS / name).read_text(), re.MULTILINE)
    assert set(runs) <= {name}, f"{name}: its Run line names {runs}"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_documented_ema_overrides_save_the_ema(name):
    """A comment that tells how to turn EMA on gives a run whose outputs and samples hold the EMA."""
    from finetune.outputs import output_kinds

    for line in (PRESETS / name).read_text().splitlines():
        if line.startswith("#") and "--set ema.enabled=true" in line:
            cfg = load_config(FinetuneConfig, PRESETS / name, re.findall(r"--set (\S+?)`?(?:\s|$)", line))
            assert output_kinds(cfg.checkpoint.weights, cfg.ema.enabled)[0] == "ema", f"{name}: {line}"
