"""The umbrella CLI: lazy stage loading, one-line errors and exit codes, shared config options."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from xlbake import __version__, cli
from xlbake.cli import Stage, config_options, force_option, resolve_config, run_guarded, setup_logging
from xlbake.errors import ConfigError, InputError

HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "finetune", "extract", "resize")


@dataclass(frozen=True)
class DummyConfig:
    rank: int = 4
    """LoRA rank."""
    out: Path = Path("out.safetensors")
    """Output file."""


@click.command()
@click.option("--fail", type=click.Choice(["none", "input", "config", "interrupt", "bug"]), default="none")
@run_guarded
def dummy(fail: str) -> None:
    if fail == "input":
        raise InputError("model.ckpt: pickle checkpoints are refused; convert it to .safetensors")
    if fail == "config":
        raise ConfigError("2 config problems:\n  a.yaml:1: x: unknown key\n  a.yaml:2: y: expected a number")
    if fail == "interrupt":
        raise KeyboardInterrupt
    if fail == "bug":
        raise RuntimeError("a real bug keeps its traceback")
    click.echo("ran")


@click.command()
@config_options
@force_option
@run_guarded
def configured(config: Path | None, overrides: tuple[str, ...], dry_run: bool, force: bool) -> None:
    cfg = resolve_config(DummyConfig, config, overrides, dry_run)
    click.echo(f"rank={cfg.rank} out={cfg.out} force={force}")


def test_run_guarded_turns_known_errors_into_one_line_exit_1():
    result = CliRunner().invoke(dummy, ["--fail", "input"])
    assert result.exit_code == 1
    assert result.output == "Error: model.ckpt: pickle checkpoints are refused; convert it to .safetensors\n"
    assert "Traceback" not in result.output


def test_run_guarded_keeps_every_config_problem():
    result = CliRunner().invoke(dummy, ["--fail", "config"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Error: 2 config problems:",
        "  a.yaml:1: x: unknown key",
        "  a.yaml:2: y: expected a number",
    ]


def test_run_guarded_ctrl_c_exits_130_with_one_line():
    result = CliRunner().invoke(dummy, ["--fail", "interrupt"])
    assert result.exit_code == 130
    assert result.stderr == "Interrupted (Ctrl-C); stopped.\n" and result.stdout == ""


def test_run_guarded_passes_success_and_leaves_bugs_alone():
    assert CliRunner().invoke(dummy, []).output == "ran\n"
    result = CliRunner().invoke(dummy, ["--fail", "bug"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_config_options_load_override_and_dry_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rank: 8\nout: lora.safetensors\n")
    runner = CliRunner()
    result = runner.invoke(configured, ["--config", str(config), "--set", "rank=16", "--force"])
    assert result.exit_code == 0, result.output
    assert result.output == f"rank=16 out={tmp_path / 'lora.safetensors'} force=True\n"
    result = runner.invoke(configured, ["--config", str(config), "--dry-run", "--set", "rank=32"])
    assert result.exit_code == 0 and "rank=" not in result.output  # the body stops after printing
    assert yaml.safe_load(result.output) == {"rank": 32, "out": str(tmp_path / "lora.safetensors")}


def test_config_options_report_bad_config_in_one_message(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rnak: 8\n")
    result = CliRunner().invoke(configured, ["--config", str(config), "--set", "rank=x"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Error: 2 config problems:",
        f"  {config}:1: rnak: unknown key; did you mean 'rank'?",
        '  --set: rank: expected an integer, got str "x"',
    ]
    result = CliRunner().invoke(configured, ["--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1 and "missing.yaml" in result.output


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Two stage modules on sys.path: one that works and one whose dependency is not installed."""
    (tmp_path / "xlbk_fake_stage.py").write_text(
        textwrap.dedent(
            """
            import click

            @click.command()
            @click.option("--rank", type=int, default=4)
            def main(rank):
                click.echo(f"fake stage rank={rank}")
            """
        )
    )
    (tmp_path / "xlbk_needs_dep.py").write_text("import xlbk_not_installed_dependency\n")
    (tmp_path / "xlbk_not_a_command.py").write_text("main = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "fake", Stage("xlbk_fake_stage:main", "A fake stage."))
    monkeypatch.setitem(cli.STAGES, "needsdep", Stage("xlbk_needs_dep:main", "Needs a dependency."))
    monkeypatch.setitem(cli.STAGES, "ghost", Stage("xlbk_ghost_stage.cli:main", "Not installed."))
    monkeypatch.setitem(cli.STAGES, "broken", Stage("xlbk_not_a_command:main", "Not a command."))
    for name in ("xlbk_fake_stage", "xlbk_needs_dep", "xlbk_not_a_command"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_stage_imported_only_when_invoked(fake_stages):
    runner = CliRunner()
    result = runner.invoke(cli.main, ["--help"])
    assert result.exit_code == 0 and "fake" in result.output and "A fake stage." in result.output
    assert "xlbk_fake_stage" not in sys.modules
    result = runner.invoke(cli.main, ["fake", "--rank", "8"])
    assert result.exit_code == 0 and result.output == "fake stage rank=8\n"
    assert "xlbk_fake_stage" in sys.modules
    assert "Usage: xlbake fake" in runner.invoke(cli.main, ["fake", "--help"]).output


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ghost", "command 'ghost' is not installed (no module xlbk_ghost_stage.cli); reinstall xlbake: make install"),
        ("needsdep", "command 'needsdep' needs the package 'xlbk_not_installed_dependency', which is not installed"),
        ("broken", "command 'broken': xlbk_not_a_command:main is not a click command"),
    ],
)
def test_unloadable_stage_is_one_clear_line(fake_stages, name, message):
    result = CliRunner().invoke(cli.main, [name])
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 1 and result.output.startswith(f"Error: {message}")


def test_version_and_builtin_stage_map():
    assert CliRunner().invoke(cli.main, ["--version"]).output == f"xlbake, version {__version__}\n"
    targets = {name: stage.target for name, stage in cli.STAGES.items()}
    assert targets["finetune"] == "finetune.cli:main"
    assert targets["extract"] == "extract.cli:main"
    assert targets["resize"] == "resize.cli:main"


@pytest.mark.parametrize("name", sorted(cli.STAGES))
def test_every_mapped_command_loads(name):
    """Each map line names a real click command, and its help runs (catches a typo in a target string)."""
    command = cli.load_command(name, cli.STAGES[name].target)
    assert isinstance(command, click.Command)
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.slow
def test_help_in_a_fresh_process_imports_no_stage_and_no_torch():
    probe = textwrap.dedent(
        """
        import json, sys
        from xlbake.cli import main
        try:
            main(["--help"], prog_name="xlbake")
        except SystemExit as exc:
            code = exc.code
        print(json.dumps({"code": code, "modules": sorted(m.split(".")[0] for m in sys.modules)}))
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    *help_lines, last = done.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["code"] == 0
    assert {"finetune", "extract", "resize"} <= {line.split()[0] for line in help_lines if line.startswith("  ")}
    assert set(HEAVY_MODULES).isdisjoint(report["modules"]), set(HEAVY_MODULES) & set(report["modules"])


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in cli.NOISY_LOGGERS})
    yield
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_setup_logging_levels(restore_logging):
    setup_logging(verbose=False)
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("diffusers").level == logging.WARNING
    setup_logging(verbose=True)
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("diffusers").level == logging.DEBUG



def test_library_noise_dropped_unless_verbose(restore_logging):
    logger = logging.getLogger("DeepSpeed")
    noise = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU.", None, None)
    other = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, "ZeRO stage 3 offload", None, None)
    setup_logging(verbose=False)
    assert not logger.filter(noise) and logger.filter(other)
    setup_logging(verbose=True)
    assert logger.filter(noise)

@pytest.mark.slow
@pytest.mark.parametrize("package", ["xlbake", "finetune"])
def test_python_dash_m_runs_the_command(package):
    done = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Usage: python -m {package}" in done.stdout


LIBRARY_NOISE = (
    "requires torchvision",  # transformers, on importing the pipeline's image processor
    "gradient_checkpointing_enable",  # transformers' FutureWarning for the old checkpointing name
    "Setting accelerator to CPU",  # DeepSpeed's accelerator probe, printed on stdout
    "should be kept in float32: []",  # diffusers, on casting a frozen UNet (which has no such modules)
    "FutureWarning",
)


@pytest.mark.slow
def test_finetune_run_prints_no_library_noise(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "--config", str(repo / "configs/finetune/tiny-cpu.yaml"),
         "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.max_steps=1", "--set", "sample.prompts=[]",
         "--set", "model.gradient_checkpointing=true", "--set", "data.resolution=32",
         "--set", "precision.mixed=bf16", "--set", "optim.unet_lr=0"],
        capture_output=True, text=True, timeout=600, cwd=repo,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Finished 1 steps" in done.stdout
    output = done.stdout + done.stderr
    assert [noise for noise in LIBRARY_NOISE if noise in output] == []
