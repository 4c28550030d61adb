"""Bad input at every stage, table-driven through the real stage commands (``finetune|extract|resize.cli.main``).

Every case must end the way a user on a rented box needs: exit code 1, exactly one line on stderr,
``Error: <the file or key>: what is wrong; what to do``, no traceback, and nothing written, replaced or left
behind on disk (the whole case folder, inputs included, is compared before and after). Finetune cases whose
problem is knowable from the config and the files alone must be reported before the model is loaded (a typo
found after minutes of loading SDXL is the failure this suite exists for). docs/bad-input.md lists the cases.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from reliability_helpers import (
    changes,
    drop_prefix,
    edit_safetensors,
    loha,
    malicious_pickle,
    nan_at,
    perturbed_copy,
    read_tensors,
    sd15_checkpoint,
    set_item,
    snapshot,
    truncated_copy,
    visible_lines,
    write_test_lora,
)
from safetensors.torch import save_file

UNET_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"  # a LoRA target of the tiny SDXL
TE2_LAST_BLOCK = "conditioner.embedders.1.model.transformer.resblocks.2."
LORA_DOWN = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"


@dataclass(frozen=True)
class Assets:
    """Valid inputs shared by the cases (built once); each case copies what it breaks into its own folder."""

    base: Path  # the tiny SDXL single file
    components: Path  # its diffusers folder (configs, tokenizers)
    tuned: Path  # a perturbed copy of base
    lora: Path  # a small kohya LoRA
    images: Path  # a kohya concept folder of the demo dataset


@dataclass(frozen=True)
class CaseDir:
    """A case's folder: inputs go to ``in/``, outputs to ``out/``."""

    dir: Path
    assets: Assets

    def path(self, name: str) -> Path:
        return self.dir / "in" / name


@dataclass(frozen=True)
class Case:
    id: str
    stage: str  # "finetune" | "extract" | "resize"
    build: Callable[[CaseDir], list[str]]  # writes the bad input, returns the command's arguments
    expect: tuple[str, ...]  # regexes the error line must match (case-insensitive): the file/key and the remedy
    before_model: bool = False  # finetune: must be reported before the model is loaded


# ---------------------------------------------------------------- finetune inputs


def finetune_config(c: CaseDir, changes: dict[str, object] | None = None, text: str | None = None) -> Path:
    """A tiny valid finetune config in the case folder (relative paths: against the config), with dotted changes."""
    data = {
        "run_dir": "run",
        "model": {"base": str(c.assets.base), "components": str(c.assets.components)},
        "data": {"roots": ["data"], "resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_step": 8},
        "train": {"epochs": 1, "max_steps": 1, "batch_size": 1},
        "precision": {"mixed": "no"},
        "log": {"progress": False, "tensorboard": False, "loss_plot": False},
    }
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = c.dir / "train.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data), encoding="utf-8")
    return path


def concept(c: CaseDir, folder: str = "1_xlbk emblem", n: int = 2, captions: bool = True) -> Path:
    """``data/<folder>/`` with ``n`` demo images (and their captions)."""
    target = c.dir / "data" / folder
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(c.assets.images.glob("*.png"))[:n]:
        (target / image.name).write_bytes(image.read_bytes())
        if captions:
            (target / image.with_suffix(".txt").name).write_text(image.with_suffix(".txt").read_text())
    return target


def ft(c: CaseDir, changes: dict[str, object] | None = None, *extra: str, text: str | None = None) -> list[str]:
    """Arguments of a finetune run on a good dataset with the config ``changes``."""
    concept(c)
    return ["--config", str(finetune_config(c, changes, text)), *extra]


def ft_data(c: CaseDir, make: Callable[[CaseDir], object]) -> list[str]:
    """Arguments of a finetune run whose dataset ``make`` builds."""
    make(c)
    return ["--config", str(finetune_config(c))]


def corrupt_image(c: CaseDir) -> None:
    folder = concept(c)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (folder / "broken.txt").write_text("xlbk emblem")


def resume_mismatch(c: CaseDir) -> list[str]:
    """A run folder with a state trained at unet_lr 1e-6; the config now says 2e-6."""
    from finetune.config import FinetuneConfig
    from finetune.state import TrainerState, write_state
    from xlbake.config import config_hash, dump_yaml, load_config, to_dict

    concept(c)
    cfg = load_config(FinetuneConfig, finetune_config(c, {"optim.unet_lr": 1e-6}))
    (c.dir / "run").mkdir()
    (c.dir / "run" / "config.resolved.yaml").write_text(dump_yaml(cfg))
    state = TrainerState(global_step=2, config_hash=config_hash(cfg), config=to_dict(cfg))
    write_state(c.dir / "run" / "state", state, lambda d: (d / "model.safetensors").write_bytes(b""), {}, keep=2)
    return ["--config", str(finetune_config(c, {"optim.unet_lr": 2e-6})), "--resume", "auto"]


# ---------------------------------------------------------------- extract / resize inputs


def ex(c: CaseDir, base: Path | None = None, tuned: Path | None = None, out: str | None = None) -> list[str]:
    out = out or str(c.dir / "out" / "lora.safetensors")
    return ["--base", str(base or c.assets.base), "--tuned", str(tuned or c.assets.tuned), "--out", out]


def tuned_with(c: CaseDir, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    return edit_safetensors(c.assets.tuned, c.path("tuned.safetensors"), edit)


def rs(c: CaseDir, lora: Path | None = None, *extra: str, out: str | None = None) -> list[str]:
    out = out or str(c.dir / "out" / "small.safetensors")
    return ["--lora", str(lora or c.assets.lora), "--out", out, *(extra or ("--rank", "4"))]


def lora_with(c: CaseDir, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    return edit_safetensors(c.assets.lora, c.path("lora.safetensors"), edit)


def existing(c: CaseDir, name: str) -> str:
    """An output that already exists."""
    (c.dir / "out" / name).write_bytes(b"an earlier result")
    return str(c.dir / "out" / name)


def blocker(c: CaseDir) -> str:
    """An output folder that cannot be created: its parent is a regular file (works as root, unlike chmod)."""
    (c.dir / "out" / "blocker").write_text("a file, not a folder")
    return str(c.dir / "out" / "blocker" / "sub" / "lora.safetensors")


def used_run_dir(c: CaseDir) -> str:
    """A run folder holding an earlier run's file."""
    (c.dir / "old").mkdir()
    (c.dir / "old" / "notes.txt").write_text("an earlier run")
    return "old"


def blocked_run_dir(c: CaseDir) -> str:
    """A run folder that cannot be created: its parent is a regular file."""
    (c.dir / "blocker").write_text("a file, not a folder")
    return "blocker/run"


def pickled(c: CaseDir, name: str) -> Path:
    """A pickle that would create ``UNPICKLED`` in the case folder if it were ever unpickled."""
    return malicious_pickle(c.path(name), c.dir / "UNPICKLED")


def truncated(c: CaseDir, src: Path, stem: str) -> Path:
    return truncated_copy(src, c.path(f"{stem}.safetensors"))


def copied(c: CaseDir, src: Path, stem: str) -> Path:
    """A byte copy under another name: the same model, not the same path."""
    dst = c.path(f"{stem}.safetensors")
    dst.write_bytes(src.read_bytes())
    return dst


# ---------------------------------------------------------------- the table

F, E, R = "finetune", "extract", "resize"
TUNED, LORA, KEY, DOWN = r"tuned\.safetensors", r"lora\.safetensors", re.escape(UNET_KEY), re.escape(LORA_DOWN)


def ft_with(changes: dict[str, object], *extra: str) -> Callable[[CaseDir], list[str]]:
    return lambda c: ft(c, changes, *extra)


def bad_tuned(edit: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[CaseDir], list[str]]:
    return lambda c: ex(c, tuned=tuned_with(c, edit))


def bad_lora(edit: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[CaseDir], list[str]]:
    return lambda c: rs(c, lora_with(c, edit))


def shorter(t: torch.Tensor) -> torch.Tensor:
    return t[:-1].clone()


def as_int(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32)


CASES = [
    # config files and options (any stage; config errors come before anything heavy)
    Case("yaml-syntax", F, lambda c: ft(c, text="train: [epochs: 1\n"), (r"train\.yaml", r":\d")),
    Case("yaml-unknown-key", F, ft_with({"optim.unet_lrr": 1e-6}), (r"train\.yaml", "unet_lrr", "unet_lr")),
    Case("yaml-wrong-type", F, ft_with({"train.epochs": "many"}), (r"train\.yaml", r"train\.epochs")),
    Case("yaml-contradiction", F, ft_with({"checkpoint.weights": "ema"}), (r"checkpoint\.weights", r"ema\.enabled")),
    Case("override-bad-value", F, ft_with({}, "--set", "train.epochs=0"), (r"--set|train\.epochs", ">= 1")),
    Case("config-missing", F, lambda c: ["--config", str(c.dir / "nope.yaml")], (r"nope\.yaml",)),
    Case(
        "yaml-python-tag",
        F,
        lambda c: ft(c, text=f"run_dir: !!python/object/apply:os.makedirs [{c.dir}/UNPICKLED]"),
        (r"train\.yaml",),
    ),
    Case("optimizer-not-allowed", F, ft_with({"optim.name": "torch.optim.SGD"}), (r"optim\.name", "adamw")),
    Case(
        "extract-config-unknown-key",
        E,
        lambda c: [*ex(c), "--config", str(finetune_config(c, text="dimm: 8\n"))],
        (r"train\.yaml", "dimm", "dim"),
    ),
    Case("extract-missing-tuned", E, lambda c: ex(c)[:2] + ex(c)[4:], ("--tuned",)),
    Case("resize-rank-not-a-number", R, lambda c: rs(c, None, "--rank", "four"), (r"rank", "four")),
    Case(
        "resize-contradiction",
        R,
        lambda c: rs(c, None, "--size", "1MB", "--method", "sv_fro", "--value", "0.9"),
        ("size", "method|sv_fro"),
    ),
    # datasets (finetune): all knowable before the model is loaded
    Case("data-root-missing", F, lambda c: ft_data(c, lambda c: None), (r"data", "roots|folder"), True),
    Case("data-empty", F, lambda c: ft_data(c, lambda c: concept(c, n=0)), (r"data", "image|empty"), True),
    Case(
        "data-folder-naming",
        F,
        lambda c: ft_data(c, lambda c: concept(c, folder="xlbk emblem")),
        ("xlbk emblem", r"N_|repeats|\d+_"),
        True,
    ),
    Case("data-corrupt-image", F, lambda c: ft_data(c, corrupt_image), (r"broken\.png",), True),
    Case(
        "data-missing-caption",
        F,
        lambda c: ft_data(c, lambda c: concept(c, captions=False)),
        (r"\.png|caption", "caption"),
        True,
    ),
    # run folders and resume (finetune)
    Case("run-dir-not-empty", F, lambda c: ft(c, {"run_dir": used_run_dir(c)}), ("old", "--resume|--force"), True),
    Case("run-dir-unwritable", F, lambda c: ft(c, {"run_dir": blocked_run_dir(c)}), ("blocker",), True),
    Case("resume-mismatch", F, resume_mismatch, (r"step-00000002|state", r"optim\.unet_lr"), True),
    # model files
    Case("finetune-base-missing", F, ft_with({"model.base": "nope.safetensors"}), (r"nope\.safetensors",)),
    Case(
        "finetune-base-sd15",
        F,
        lambda c: ft(c, {"model.base": str(sd15_checkpoint(c.path("sd15.safetensors")))}),
        (r"sd15\.safetensors", "SDXL"),
    ),
    Case(
        "finetune-base-pickle",
        F,
        lambda c: ft(c, {"model.base": str(pickled(c, "base.ckpt"))}),
        (r"base\.ckpt", "safetensors"),
    ),
    Case(
        "finetune-base-truncated",
        F,
        lambda c: ft(c, {"model.base": str(truncated(c, c.assets.base, "base"))}),
        (r"base\.safetensors", "truncat|corrupt"),
    ),
    Case("extract-base-is-tuned", E, lambda c: ex(c, tuned=c.assets.base), (r"\.safetensors", "--tuned|same")),
    Case(
        "extract-tuned-identical",
        E,
        lambda c: ex(c, tuned=copied(c, c.assets.base, "tuned")),
        (TUNED, "identical|nothing"),
    ),
    Case(
        "extract-tuned-truncated",
        E,
        lambda c: ex(c, tuned=truncated(c, c.assets.tuned, "tuned")),
        (TUNED, "truncat|corrupt"),
    ),
    Case("extract-tuned-wrong-shape", E, bad_tuned(set_item(UNET_KEY, shorter)), (TUNED, KEY, "shape")),
    Case(
        "extract-tuned-wrong-dtype",
        E,
        bad_tuned(set_item(UNET_KEY, lambda t: t.to(torch.int32))),
        (TUNED, KEY, "dtype|int|float"),
    ),
    Case("extract-tuned-nan", E, bad_tuned(set_item(UNET_KEY, nan_at)), (TUNED, KEY, "NaN")),
    Case("extract-different-architecture", E, bad_tuned(drop_prefix(TE2_LAST_BLOCK)), (TUNED, "architecture")),
    Case(
        "extract-base-sd15",
        E,
        lambda c: ex(c, base=sd15_checkpoint(c.path("sd15.safetensors"))),
        (r"sd15\.safetensors", "SDXL"),
    ),
    Case("extract-base-pickle", E, lambda c: ex(c, base=pickled(c, "base.ckpt")), (r"base\.ckpt", "safetensors")),
    Case(
        "extract-pickle-named-safetensors",
        E,
        lambda c: ex(c, tuned=pickled(c, "tuned.safetensors")),
        (TUNED, "safetensors"),
    ),
    Case("extract-output-exists", E, lambda c: ex(c, out=existing(c, "lora.safetensors")), ("lora", "--force")),
    Case("extract-output-unwritable", E, lambda c: ex(c, out=blocker(c)), ("blocker",)),
    # LoRA files (resize)
    Case("resize-lora-loha", R, bad_lora(loha), (LORA, "hada|LoHa")),
    Case("resize-lora-truncated", R, lambda c: rs(c, truncated(c, c.assets.lora, "lora")), (LORA, "truncat|corrupt")),
    Case("resize-lora-nan", R, bad_lora(set_item(LORA_DOWN, nan_at)), (LORA, DOWN, "NaN")),
    Case(
        "resize-lora-wrong-dtype", R, bad_lora(set_item(LORA_DOWN, lambda t: t.to(torch.int8))), (LORA, DOWN, "float")
    ),
    Case("resize-lora-wrong-shape", R, bad_lora(set_item(LORA_DOWN, shorter)), (LORA, "rank|shape")),
    Case("resize-checkpoint-not-lora", R, lambda c: rs(c, c.assets.base), (r"\.safetensors", "not a LoRA")),
    Case("resize-lora-pickle", R, lambda c: rs(c, pickled(c, "lora.pt")), (r"lora\.pt", "safetensors")),
    Case("resize-output-exists", R, lambda c: rs(c, out=existing(c, "small.safetensors")), ("small", "--force")),
    Case("resize-output-unwritable", R, lambda c: rs(c, out=blocker(c)), ("blocker",)),
]
SUBPROCESS_CASES = ("yaml-syntax", "extract-tuned-truncated", "resize-lora-pickle")


# ---------------------------------------------------------------- running and judging


@pytest.fixture(scope="module")
def assets(tiny_paths, demo_dataset, tmp_path_factory) -> Assets:
    folder = tmp_path_factory.mktemp("bad-input-assets")
    tuned = perturbed_copy(tiny_paths.single_file, folder / "tuned.safetensors", seed=1)
    lora = write_test_lora(folder / "lora.safetensors")
    images = next(p for p in demo_dataset.iterdir() if p.is_dir())
    return Assets(tiny_paths.single_file, tiny_paths.diffusers_dir, tuned, lora, images)


@pytest.fixture
def restore_logging():
    """Stage commands configure logging onto CliRunner's streams; give the next test the logging it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def judge(case: Case, args: Sequence[str], code: int, stderr: str, output: str, other: str, changed: list[str]) -> None:
    """Assert the contract of a failed command; every violation is listed at once (``other``: found by the caller)."""
    problems = [other] if other else []
    if code != 1:
        problems.append(f"exit code {code}, expected 1")
    if "Traceback" in output:
        problems.append("a traceback was printed")
    lines = visible_lines(stderr)
    if len(lines) != 1 or not lines[0].startswith("Error: "):
        problems.append(f"stderr must be one 'Error: ...' line, got {lines!r}")
    error = next((line for line in lines if line.startswith("Error: ")), "")
    problems += [f"the error line does not match {p!r}" for p in case.expect if not re.search(p, error, re.I)]
    if changed:
        problems.append(f"files written or changed on disk: {changed}")
    command = f"python -m {case.stage} {' '.join(args)}"
    assert not problems, f"[{case.id}] {command}\n  " + "\n  ".join(problems)


def prepare(case: Case, assets: Assets, tmp_path: Path) -> tuple[CaseDir, list[str]]:
    c = CaseDir(tmp_path, assets)
    for name in ("in", "out"):
        (tmp_path / name).mkdir(parents=True)
    return c, case.build(c)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, assets, tmp_path, monkeypatch, restore_logging):
    c, args = prepare(case, assets, tmp_path)
    loads: list[object] = []
    if case.before_model:  # record (not prevent) model loading, so the message is still judged
        import finetune.model
        import finetune.trainer

        real = finetune.model.load_model
        monkeypatch.setattr(finetune.trainer, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    command = importlib.import_module(f"{case.stage}.cli").main
    before = snapshot(tmp_path)
    result = CliRunner().invoke(command, args, env={"HF_HUB_OFFLINE": "1"})
    crash = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crash = "uncaught exception:\n" + "".join(traceback.format_exception(*result.exc_info))[-3000:]
    changed = changes(before, snapshot(tmp_path))
    late = "the model was loaded before this problem was reported" if loads else ""
    judge(case, args, result.exit_code, result.stderr, result.output, "\n".join(p for p in (crash, late) if p), changed)
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was unpickled with full pickle semantics"


@pytest.mark.slow
def test_real_entry_points(assets, tmp_path):
    """A few cases through ``python -m <stage>`` itself (all started at once to share the import time)."""
    chosen = [case for case in CASES if case.id in SUBPROCESS_CASES]
    runs = []
    for case in chosen:
        c, args = prepare(case, assets, tmp_path / case.id)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", case.stage, *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((case, c, args, process, snapshot(c.dir)))
    for case, c, args, process, before in runs:
        stdout, stderr = process.communicate(timeout=300)
        judge(case, args, process.returncode, stderr, stdout + stderr, "", changes(before, snapshot(c.dir)))


def test_every_case_is_documented():
    text = DOCS.read_text(encoding="utf-8")
    assert len(CASES) >= 25
    missing = [case.id for case in CASES if f"`{case.id}`" not in text]
    assert not missing, f"{DOCS} does not list {missing}"


def test_config_cannot_run_code_or_import_classes(tmp_path):
    """The finetune config's optimizer is a name from an allow-list, and YAML tags never build objects."""
    from finetune.config import FinetuneConfig
    from xlbake.config import load_config
    from xlbake.errors import ConfigError

    marker = tmp_path / "RAN"
    for text in (
        f"optim: {{name: !!python/object/apply:os.makedirs [{marker}]}}\n",
        "optim: {args: {foo: !!python/name:os.system }}\n",
        "optim: {name: torch.optim.SGD}\n",
    ):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"c\.yaml"):
            load_config(FinetuneConfig, path)
    assert not marker.exists()


def test_lora_metadata_is_untrusted_text(assets, tmp_path, restore_logging):
    """Python, YAML and odd JSON in a LoRA's header are carried or dropped as text, never evaluated."""
    from resize.cli import main

    marker = tmp_path / "EVALUATED"
    payloads = {
        "ss_network_args": f"__import__('os').makedirs('{marker}')",
        "ss_tag_frequency": f'{{"a": "!!python/object/apply:os.makedirs [{marker}]"}}',
        "ss_datasets": "[" * 50,
        "xlbake_resize": "{{'exec': 1}}",
    }
    tensors, metadata = read_tensors(assets.lora)
    lora = tmp_path / "lora.safetensors"
    save_file(tensors, str(lora), metadata={**metadata, **payloads})
    out = tmp_path / "small.safetensors"
    result = CliRunner().invoke(main, ["--lora", str(lora), "--rank", "4", "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    _, written = read_tensors(out)
    assert written.get("ss_tag_frequency") == payloads["ss_tag_frequency"]


def test_configs_resolve_paths_against_their_folder(assets, tmp_path):
    """A relative path in a config means beside the config file, never the working folder of the caller."""
    from finetune.config import FinetuneConfig
    from xlbake.config import load_config

    c = CaseDir(tmp_path, assets)
    cfg = load_config(FinetuneConfig, finetune_config(c, {"run_dir": "runs/a", "data.roots": ["data"]}))
    assert cfg.run_dir == tmp_path / "runs" / "a" and cfg.data.roots == (tmp_path / "data",)
