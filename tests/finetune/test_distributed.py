"""Multi-process training on the CPU: DDP (gloo) and DeepSpeed ZeRO-2/3 through `accelerate launch`, plus the
DeepSpeed config checks and the building blocks they rely on.

Each launched mode trains the tiny model for 4 steps over 2 processes (state saved at step 2), then, in the same
launched processes (tests/distributed_helpers.py: half the start-up cost), runs the CLI again to resume that state
into another run folder. The helper makes every process record its batches, its final whole weights and every
path it writes (wrapping the trainer from outside), so the tests can check: the processes saw different images,
ended with identical weights, only process 0 wrote the run's files, ZeRO-2/3 end with the weights DDP ends with,
and the resumed run ends exactly where the uninterrupted one did.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from distributed_helpers import NAN_ENV, SEPARATOR
from safetensors.torch import load_file
from tiny_run import tiny_run_sections
from torch import nn

from finetune.cli import main as finetune_main
from finetune.config import FinetuneConfig
from finetune.distributed import (
    Denoiser,
    rank_seed,
)
from finetune.launch import ZeroSettings, check_zero, launch_zero_settings
from finetune.state import STATE_FILE, TrainerState, read_trainer_state, state_dirs, write_state
from xlbake.config import dump_yaml, load_config
from xlbake.errors import ConfigError
from xlbake.fileio import TEMP_PREFIX
from xlbake.sdxl.parts import PART_ATTRS

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
HELPERS = Path(__file__).resolve().parent.parent / "distributed_helpers.py"
CPU_ADAM_RESUME_DRIFT = 0.1
"""Largest weight difference between a resumed and an unbroken CPU Adam run, as a share of the largest change."""
DDP_MATCH = 1e-2
"""Largest difference between a ZeRO run's and the DDP run's weights of a component (Frobenius, over all its
tensors), as a share of what DDP changed. Weights with a gradient agree to rounding (measured ~5e-6: the
processes' gradients are reduced in another order); but the tiny UNet's GroupNorms have one channel per group, so
the biases and time-embedding projections feeding them get a gradient that is exactly zero but for rounding noise,
which Adam turns into steps of up to the LR, different in every implementation: the UNet's drift is ~6e-4 of its
change for ZeRO-2 (max 1e-3 measured). A lost step, LR, clipping or part moves a component by O(1) of its change."""
LAUNCH_TIMEOUT = 900  # seconds; a hung collective must fail the test, not the CI job
GPU_COMMAND = (
    "on a GPU box: accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml --num_processes 2 "
    "-m finetune --config configs/finetune/tiny-cpu.yaml --set precision.mixed=fp16 --set ema.enabled=false"
)
MODES = {
    # name: (accelerate launch arguments, extra environment, finetune overrides)
    "ddp": (["--config_file", "configs/accelerate/cpu-2proc-ddp.yaml"], {"ACCELERATE_USE_CPU": "true"}, []),
    "zero2": (
        ["--config_file", "configs/accelerate/deepspeed-zero2.yaml", "--num_processes", "2"]
        + ["--offload_optimizer_device", "none"],
        {},
        [],
    ),
    "zero3": (
        ["--config_file", "configs/accelerate/deepspeed-zero3.yaml", "--num_processes", "2"],
        {},
        # EMA is refused under ZeRO-3; samples and the diffusers folder read the split weights (gathered)
        ["ema.enabled=false", "checkpoint.weights=raw", "checkpoint.diffusers=true"]
        + ["sample.prompts=[xlbk emblem]", "sample.steps=1", "sample.width=32", "sample.height=32"],
    ),
    # the shipped ZeRO-2 config as it is: optimizer states in host RAM, stepped by DeepSpeed's CPU Adam
    "zero2-offload": (["--config_file", "configs/accelerate/deepspeed-zero2.yaml", "--num_processes", "2"], {}, []),
}


def cpu_adam_built() -> bool:
    """DeepSpeed's CPU Adam op is prebuilt (DS_BUILD_CPU_ADAM=1 pip install deepspeed) or already JIT-compiled."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        return False
    from torch.utils.cpp_extension import get_default_build_root

    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(Path(spec.origin).parent.glob("ops/**/cpu_adam*.so")) or any(cache.glob("*/cpu_adam/cpu_adam*.so"))


# The shipped ZeRO-2 config offloads the optimizer to DeepSpeed's CPU Adam: a case of its own, skipped where that op
# is not built (building it is a one-time compile of several minutes).
ZERO2_OFFLOAD = pytest.param(
    "zero2-offload",
    marks=pytest.mark.skipif(
        not cpu_adam_built(),
        reason="the shipped ZeRO-2 preset (optimizer offloaded to DeepSpeed's CPU Adam) is not tested: CPU Adam is "
        "not built here (DS_BUILD_CPU_ADAM=1 pip install deepspeed)",
    ),
)
DEEPSPEED_MODES = ("zero2", "zero3", ZERO2_OFFLOAD)
LAUNCHED = ("ddp", *DEEPSPEED_MODES)
"""Modes trained and resumed by the ``launched`` fixture."""


def launched_test(test):
    """Slow, and on one xdist worker: launches share the 2 cores, and the ``launched`` runs are made once."""
    return pytest.mark.slow(pytest.mark.xdist_group("distributed")(test))


def tiny_config(tiny_paths, demo_dataset, run_dir: Path, *overrides: str) -> FinetuneConfig:
    """4 optimizer steps of batch 2 on 2 processes (one epoch of the 8-image demo set with 2 repeats), EMA and
    both weights saved, training state at step 2."""
    data = {
        **tiny_run_sections(tiny_paths, demo_dataset, run_dir),
        "train": {"seed": 3, "epochs": 2, "max_steps": 4, "batch_size": 2},
        "optim": {"unet_lr": 1e-3, "te1_lr": 2e-4, "te2_lr": 2e-4},
        "precision": {"mixed": "no"},
        "ema": {"enabled": True, "beta": 0.8},
        "checkpoint": {"every_steps": 2, "weights": "both"},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    return load_config(FinetuneConfig, data=data, overrides=overrides)


# ---------------------------------------------------------------------- config checks (fast)

ZERO2 = ZeroSettings(stage=2, offload_optimizer="none", gradient_clipping=None, grad_accum=None, micro_batch=None)


def cfg_with(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, data={"precision": {"mixed": "no"}}, overrides=overrides)


def test_zero3_with_ema_is_refused_with_the_reason():
    zero3 = ZeroSettings(3, "none", None, None, None)
    with pytest.raises(ConfigError, match=r"ema\.enabled: EMA cannot follow DeepSpeed ZeRO-3.*ema\.enabled: false"):
        check_zero(cfg_with("ema.enabled=true"), zero3)
    check_zero(cfg_with("ema.enabled=false"), zero3)


def test_ema_over_16bit_deepspeed_weights_is_refused():
    with pytest.raises(ConfigError, match=r"ema\.enabled: under DeepSpeed with precision\.mixed: bf16"):
        check_zero(cfg_with("ema.enabled=true", "precision.mixed=bf16"), ZERO2)
    check_zero(cfg_with("ema.enabled=true"), ZERO2)  # fp32 weights: EMA follows them as without DeepSpeed


def test_every_mismatch_with_the_deepspeed_config_is_listed_at_once():
    zero = ZeroSettings(stage=2, offload_optimizer="cpu", gradient_clipping=0.5, grad_accum=4, micro_batch=8)
    with pytest.raises(ConfigError) as err:
        check_zero(cfg_with("optim.name=adafactor", "train.grad_accum=2", "train.batch_size=1"), zero)
    message = str(err.value)
    for key in ("optim.name: adafactor", "optim.max_grad_norm: 1.0", "train.grad_accum: 2", "train.batch_size: 1"):
        assert key in message
    assert "\n" not in message


def test_launch_settings_come_from_accelerate_launch_environment(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert launch_zero_settings() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    assert launch_zero_settings() == ZeroSettings(3, "cpu", 0.5, None, None)


def test_cli_refuses_zero3_ema_before_writing_anything(tmp_path, monkeypatch):
    """What `accelerate launch --use_deepspeed --zero_stage 3 -m finetune` does with an EMA config."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    run_dir = tmp_path / "run"
    args = ["--set", f"run_dir={run_dir}", "--set", "ema.enabled=true", "--set", "precision.mixed=no"]
    result = CliRunner().invoke(finetune_main, args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "ema.enabled: EMA cannot follow DeepSpeed ZeRO-3" in result.output
    assert not run_dir.exists()


# ---------------------------------------------------------------------- building blocks (fast)


def test_rank_seeds_keep_rank0_and_differ_between_ranks():
    seeds = [rank_seed(7, rank) for rank in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [rank_seed(7, rank) for rank in range(4)]  # deterministic


def test_denoiser_registers_only_the_trained_parts():
    parts = {name: nn.Linear(2, 2) for name in ("unet", "te1", "te2")}
    denoiser = Denoiser(parts, ["unet", "te2"])
    assert {id(p) for p in denoiser.parameters()} == {id(p) for n in ("unet", "te2") for p in parts[n].parameters()}
    assert all(key.startswith(("trained.unet.", "trained.te2.")) for key in denoiser.state_dict())
    assert denoiser.parts["te1"] is parts["te1"]


def test_state_is_saved_by_all_processes_into_one_folder(tmp_path):
    """Two threads stand in for two processes: each saves its own file; the folder holds both and our state."""
    barrier = threading.Barrier(2, timeout=30)
    results: dict[int, Path] = {}

    def process(rank: int) -> None:
        def save_accelerate(folder: Path) -> None:
            (folder / f"random_states_{rank}.pkl").write_text(str(rank))

        state = TrainerState(global_step=5)
        results[rank] = write_state(tmp_path, state, save_accelerate, {}, keep=2, main=rank == 0, barrier=barrier.wait)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    folder = tmp_path / "step-00000005"
    assert results == {0: folder, 1: folder}
    assert sorted(p.name for p in folder.iterdir()) == ["random_states_0.pkl", "random_states_1.pkl", STATE_FILE]
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


# ---------------------------------------------------------------------- launched runs (slow)


def free_port() -> int:
    """A free TCP port for the processes' rendezvous (two launches at once must not share accelerate's 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finetune_args(mode: str, config: Path, run_dir: Path, *extra: str) -> list[str]:
    """`python -m finetune` arguments of a run in ``mode`` (its overrides) into ``run_dir``."""
    overrides = (*MODES[mode][2], f"run_dir={run_dir}")
    return ["--config", str(config), *[a for o in overrides for a in ("--set", o)], *extra]


def launch(mode: str, *runs: tuple[Path, list[str]], nan: str = "") -> None:
    """``accelerate launch`` 2 processes in ``mode`` for one finetune run, or two in the same processes, through
    ``tests/distributed_helpers.py``: each run given as (trace folder, CLI arguments); fails with the output's tail.
    ``nan``: ``RANK:STEP:BATCH``, a NaN loss in one process (the helper's XLBAKE_TEST_NAN)."""
    launch_args, env_extra, _ = MODES[mode]
    if nan:
        env_extra = {**env_extra, NAN_ENV: nan}
    target = [str(HELPERS)]
    for trace, args in runs:
        target += [SEPARATOR] * (len(target) > 1) + [str(trace), *args]
    command = [str(ACCELERATE), "launch", "--main_process_port", str(free_port()), *launch_args, *target]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env_extra}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


LAUNCHES: dict[str, Path] = {}
"""Mode -> root folder of its launch, made once per session (the DDP one is also the ZeRO runs' reference)."""


def launch_once(mode: str, tiny_paths, demo_dataset, tmp_path_factory) -> Path:
    """Run A: 4 steps from scratch (state at step 2). Run B, in the same launch: resumed from A's step-2 state in a
    new run folder. Returns the folder of both (and their traces)."""
    if mode in LAUNCHES:
        return LAUNCHES[mode]
    if mode != "ddp":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install xlbake[deepspeed]")
    root = tmp_path_factory.mktemp(mode)
    config = root / "config.yaml"
    config.write_text(dump_yaml(tiny_config(tiny_paths, demo_dataset, root / "run")), encoding="utf-8")
    resume = ("--resume", str(root / "run/state/step-00000002"))
    launch(
        mode,
        (root / "trace", finetune_args(mode, config, root / "run")),
        (root / "trace-resumed", finetune_args(mode, config, root / "resumed", *resume)),
    )
    LAUNCHES[mode] = root
    return root


@pytest.fixture(scope="module", params=LAUNCHED)
def launched(request, tiny_paths, demo_dataset, tmp_path_factory):
    """(mode, launch folder, tiny model paths) of each launched mode."""
    return request.param, launch_once(request.param, tiny_paths, demo_dataset, tmp_path_factory), tiny_paths


def batches(trace: Path, rank: int) -> list[str]:
    return [line.split(" ", 2)[2] for line in (trace / f"rank{rank}.txt").read_text().splitlines()]


def by_component(traced: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A trace's ``{part}.{key}`` tensors as diffusers state dicts: {"unet": ..., "text_encoder": ..., ...}."""
    return {
        attr: {k.split(".", 1)[1]: v for k, v in traced.items() if k.startswith(part + ".")}
        for part, attr in PART_ATTRS.items()
    }


def writes(trace: Path, rank: int, under: Path) -> list[Path]:
    lines = (trace / f"rank{rank}.writes.txt").read_text().splitlines()
    paths = [Path(line.split(" ", 1)[1]) for line in lines]
    return [p for p in paths if p.is_relative_to(under)]


@launched_test
def test_processes_see_different_images(launched, demo_dataset):
    _, root, _ = launched
    rank0, rank1 = batches(root / "trace", 0), batches(root / "trace", 1)
    assert len(rank0) == len(rank1) == 8  # 4 steps of batch 2 each
    # Their shares partition the epoch: together they saw every image exactly twice (its 2 repeats).
    images = sorted(str(p) for p in demo_dataset.rglob("*.png"))
    assert Counter(rank0) + Counter(rank1) == Counter({image: 2 for image in images})


@launched_test
def test_processes_end_with_identical_weights(launched):
    _, root, _ = launched
    rank0, rank1 = (load_file(root / "trace" / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 500
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@launched_test
def test_only_the_main_process_writes_the_run(launched):
    mode, root, _ = launched
    run = root / "run"
    written0 = writes(root / "trace", 0, run)
    assert run / "tuned.fp32.safetensors" in written0 and run / "config.resolved.yaml" in written0
    # The other process writes only its own part of a training state (RNG, DeepSpeed shards) into the staging
    # folder that process 0 renames into place.
    for path in writes(root / "trace", 1, run):
        assert path.is_relative_to(run / "state") and path.relative_to(run / "state").parts[0].startswith(TEMP_PREFIX)
    expected = {"base.txt", "config.resolved.yaml", "checkpoints", "state", "tuned.safetensors"}
    expected.add("tuned.fp32.safetensors")
    if mode == "zero3":
        expected |= {"samples", "tuned-diffusers"}
    else:
        expected |= {"tuned-raw.safetensors", "tuned-raw.fp32.safetensors"}
    assert {p.name for p in run.iterdir()} == expected


@launched_test
@pytest.mark.parametrize("mode", DEEPSPEED_MODES)
def test_deepspeed_trains_the_weights_ddp_trains(mode, tiny_paths, demo_dataset, tmp_path_factory):
    """ZeRO-2/3 and DDP train the same seed on the same batches: the saved weights of each component agree within
    DDP_MATCH of what it trained."""
    ddp = launch_once("ddp", tiny_paths, demo_dataset, tmp_path_factory)
    root = launch_once(mode, tiny_paths, demo_dataset, tmp_path_factory)
    reference = load_file(ddp / "run/tuned-raw.fp32.safetensors")
    saved = load_file(root / "run" / ("tuned.fp32.safetensors" if mode == "zero3" else "tuned-raw.fp32.safetensors"))
    base = load_file(tiny_paths.single_file)
    assert saved.keys() == reference.keys()
    assert sum(not torch.equal(reference[k], base[k]) for k in reference) > 400  # it trained
    for component in ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."):
        keys = [k for k in reference if k.startswith(component)]
        drift = torch.stack([(saved[k] - reference[k]).norm() for k in keys]).norm()
        trained = torch.stack([(reference[k] - base[k]).norm() for k in keys]).norm()
        assert drift <= DDP_MATCH * trained, (component, drift.item(), trained.item())
    if mode == "zero3":  # the diffusers folder was saved from the gathered ZeRO-3 weights too
        dicts = by_component(load_file(root / "trace" / "rank0.safetensors"))
        unet = load_file(root / "run/tuned-diffusers/unet/diffusion_pytorch_model.safetensors")
        assert all(torch.equal(unet[k], dicts["unet"][k]) for k in dicts["unet"])


@launched_test
def test_resumed_run_ends_exactly_where_the_uninterrupted_one_did(launched):
    mode, root, tiny_paths = launched
    names = ["tuned.fp32.safetensors"] + ([] if mode == "zero3" else ["tuned-raw.fp32.safetensors"])  # EMA and raw
    base = load_file(tiny_paths.single_file)
    for name in names:
        whole, resumed = load_file(root / "run" / name), load_file(root / "resumed" / name)
        if mode != "zero2-offload":
            assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
            continue
        # DeepSpeedCPUAdam recomputes beta**step after a resume where an unbroken run multiplies it up: a last-bit
        # difference that Adam's first steps amplify. A lost state (moments, step, LR) would move weights by whole
        # steps; this stays within a few percent of one.
        drift = max((whole[k] - resumed[k]).abs().max().item() for k in whole)
        trained = max((whole[k] - base[k]).abs().max().item() for k in whole)
        assert drift <= CPU_ADAM_RESUME_DRIFT * trained, (name, drift, trained)
    # The resumed processes continued with the batches of steps 3 and 4 of the same epoch.
    for rank in (0, 1):
        assert batches(root / "trace-resumed", rank) == batches(root / "trace", rank)[4:]


@launched_test
@pytest.mark.parametrize(
    ("mode", "batch"), [("ddp", 0), ("ddp", 1), ("zero2", 1)], ids=["ddp-first-batch", "ddp-synced-batch", "zero2"]
)
def test_a_nan_on_one_process_skips_the_same_step_on_both(mode, batch, tiny_paths, demo_dataset, tmp_path):
    """on_nan: skip, a NaN loss on process 1 only, in one batch of step 2's accumulation window of 2 (the second
    one's backward all-reduces the gradients; DeepSpeed steps inside it): both processes run the same collectives,
    skip step 2 and end with identical weights."""
    config = tmp_path / "config.yaml"
    cfg = tiny_config(
        tiny_paths,
        demo_dataset,
        tmp_path / "run",
        "train.on_nan=skip",
        "train.grad_accum=2",
        "ema.enabled=false",
        "checkpoint.weights=raw",
        "checkpoint.every_steps=0",
    )
    config.write_text(dump_yaml(cfg), encoding="utf-8")
    if mode != "ddp":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install xlbake[deepspeed]")
    launch(mode, (tmp_path / "trace", finetune_args(mode, config, tmp_path / "run")), nan=f"1:2:{batch}")
    rank0, rank1 = (load_file(tmp_path / "trace" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) and torch.isfinite(rank0[k]).all() for k in rank0)
    state = read_trainer_state(state_dirs(tmp_path / "run" / "state")[-1])
    assert state.global_step == 4 and len(state.losses) == 4
    assert [torch.isfinite(torch.tensor(v)).item() for v in state.losses] == [True, False, True, True]


@launched_test
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=f"DeepSpeed fp16/bf16 engines need a GPU; {GPU_COMMAND}")
def test_deepspeed_16bit_training_on_gpu(tiny_paths, demo_dataset, tmp_path):
    config = tmp_path / "config.yaml"
    cfg = tiny_config(tiny_paths, demo_dataset, tmp_path / "run", "precision.mixed=fp16", "ema.enabled=false")
    config.write_text(dump_yaml(cfg), encoding="utf-8")
    launch("zero2", (tmp_path / "trace", finetune_args("zero2", config, tmp_path / "run")))
    assert (tmp_path / "run/tuned.fp32.safetensors").exists()
