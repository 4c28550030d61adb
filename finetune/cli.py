"""`python -m finetune --config C [--set k=v] [--dry-run] [--resume auto|PATH] [--force]` (also `xlbake finetune`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xlbake.batch.run_folder import RESOLVED_CONFIG, STATE, final_output
from xlbake.cli import EXIT_INTERRUPTED, config_options, force_option, resolve_config, run_guarded, setup_logging

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig
    from finetune.data import CheckedData
    from finetune.objective import LossConfig
    from xlbake.sdxl.checkpoint import CheckpointReader

logger = logging.getLogger(__name__)


class GpuCount(click.ParamType):
    """``8`` -> 8; ``2x8`` (nodes x GPUs per node) -> 16: every process of the launch shares the batch and the
    ZeRO partitions, so the plan counts them all."""

    name = "N|NODESxGPUS"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"(?:(\d+)x)?(\d+)", str(value).strip().lower())
        count = int(match[1] or 1) * int(match[2]) if match else 0
        if count < 1:
            self.fail(f"{value!r} is not a GPU count N or NODESxGPUS like 2x8", param, ctx)
        return count


GPU_COUNT = GpuCount()


@click.command(name="finetune", context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.option(
    "--resume",
    metavar="auto|PATH",
    default=None,
    help="Continue a run: `auto` = the newest state in RUN/state (or start if there is none), or a state folder. "
    "A finished run continues if train.max_steps or train.epochs was raised.",
)
@click.option("--plan", "plan_only", is_flag=True, help="Print the memory/steps plan (no weights loaded) and exit.")
@click.option("--gpu-memory", metavar="SIZE", default=None, help="GPU size for the plan, e.g. 80GB, 48GB, 24GB.")
@click.option("--gpus", type=GPU_COUNT, default=None, metavar="N|NODESxGPUS",
              help="GPUs for the plan: N, or NODESxGPUS (e.g. 2x8) for a multi-node launch.")  # fmt: skip
@click.option(
    "--accelerate-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="accelerate config the run will be launched with (DDP/DeepSpeed), for the plan.",
)
@force_option
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, library messages included.")
@run_guarded
def main(
    config: Path | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    resume: str | None,
    plan_only: bool,
    gpu_memory: str | None,
    gpus: int | None,
    accelerate_config: Path | None,
    force: bool,
    verbose: bool,
) -> None:
    """Full SDXL finetune (UNet and both text encoders, optional EMA) into RUN (run_dir)."""
    from finetune.config import FinetuneConfig
    from xlbake.config import dump_yaml

    cfg = resolve_config(FinetuneConfig, config, overrides, dry_run=False)
    setup_logging(verbose)
    from finetune.planner.report import check_before_training, ema_check, plan_text

    if dry_run:  # the resolved config on stdout; what it will do wrong on stderr
        click.echo(dump_yaml(cfg), nl=False)
        if warning := ema_check(cfg, int(os.environ.get("WORLD_SIZE", "1"))):
            click.echo(f"Warning: {warning}", err=True)
        return
    if plan_only:
        click.echo(plan_text(cfg, gpu_memory=gpu_memory, gpus=gpus, accelerate_config=accelerate_config))
        return
    check_before_training(cfg, gpu_memory=gpu_memory, force=force, echo=click.echo)
    from finetune.distributed import prepare_run_dir_once
    from finetune.launch import check_launch
    from finetune.trainer import run

    check_launch(cfg)  # e.g. EMA under DeepSpeed ZeRO-3, refused before anything is loaded or written
    try:
        checked = check_start(cfg, resume, force)
    except AlreadyFinished as done:
        click.echo(str(done), err=True)
        return
    prepare_run_dir_once(cfg, resume=resume is not None, force=force)
    result = run(cfg, resume, checked)
    if result.interrupted:
        click.echo(f"Interrupted at step {result.global_step}; state saved in {result.state_dir}.", err=True)
        click.echo(
            f"Resume with: python -m finetune --config {Path(cfg.run_dir) / RESOLVED_CONFIG} --resume auto", err=True
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    click.echo(f"Finished {result.global_step} steps; outputs:")
    for path in result.outputs:
        click.echo(f"  {path}")


class AlreadyFinished(Exception):
    """The run to resume has trained its configured steps and saved its outputs: nothing to do (exit 0)."""


def check_start(cfg: FinetuneConfig, resume: str | None, force: bool) -> CheckedData | None:
    """Check what can be known from the config and the files before the model loads or anything is written, so
    that a refused start costs seconds and leaves the run folder as it was: the run folder, the state to resume
    (trained with this config? already finished?), the base model's file, architecture and the prediction type it
    declares, the dataset (every image decoded once).

    Returns the checked dataset for the trainer, or None with the builtin demo dataset (drawn in setup).
    """
    from finetune.config import builtin_name
    from finetune.data import read_training_data
    from finetune.model import single_file_architecture
    from finetune.run_dir import check_run_dir
    from xlbake.errors import InputError
    from xlbake.sdxl.checkpoint import open_checkpoint

    # Under `accelerate launch` the main process may already have started the folder when another checks it: there
    # the main process alone checks it, in prepare_run_dir_once
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        check_run_dir(cfg.run_dir, resume is not None, force)
    if resume is not None:
        check_resumable(cfg, resume, force)
    base = cfg.model.base
    if builtin_name(base) is None:
        if not Path(base).exists():
            raise InputError(
                f"{base}: base model not found; set model.base to an SDXL .safetensors or diffusers folder"
            )
        with open_checkpoint(base) as reader:  # reads the header: refuses pickles, truncated files, non-SDXL models
            check_base_prediction(cfg.loss, reader)
        if Path(base).is_file():  # its architecture and tokenizers (fetched now on first use, or a clear error)
            single_file_architecture(Path(base), cfg.model.components)
    if any(builtin_name(root) is not None for root in cfg.data.roots):
        return None
    return read_training_data(cfg.data, cfg.caption)


def check_base_prediction(loss: LossConfig, reader: CheckpointReader) -> None:
    """ConfigError when the base declares the other prediction type than ``loss.prediction``, unless
    ``loss.prediction_override``: training a v-prediction model as epsilon (or back) is far more often a
    forgotten setting than an intended conversion, and its outputs would be mislabelled or broken."""
    from xlbake.errors import ConfigError
    from xlbake.sdxl.prediction import declared_prediction

    declared = declared_prediction(reader)
    if declared is None or declared.prediction == loss.prediction:
        return
    if loss.prediction_override:
        what = (declared.prediction, reader.path, loss.prediction)
        logger.warning("training the %s base %s as %s (loss.prediction_override)", *what)
        return
    raise ConfigError(
        f"loss.prediction: {loss.prediction}, but the base {reader.path} is {declared.prediction} ({declared.where}); "
        f"set loss.prediction: {declared.prediction}, or loss.prediction_override: true to retrain it as "
        f"{loss.prediction}"
    )


def check_resumable(cfg: FinetuneConfig, resume: str, force: bool) -> None:
    """Refuse a resume trained with another config, or one that finds no state and would train from step 0 over
    the run's outputs (without ``force``); AlreadyFinished if the state has trained what ``cfg`` asks for and the
    run's outputs are saved (a finished run whose outputs are missing saves them again)."""
    from finetune.run_dir import check_restart
    from finetune.state import check_resume, is_finished, read_trainer_state
    from xlbake.config import config_hash, to_dict

    folder = check_resume(Path(cfg.run_dir) / STATE, resume, to_dict(cfg), config_hash(cfg))
    if folder is None:
        if not force:
            check_restart(cfg.run_dir)
        return
    saved, train = read_trainer_state(folder), cfg.train
    saved_outputs = final_output(cfg.run_dir, cfg.checkpoint.fp32_copy).exists()
    if is_finished(saved, train.max_steps, train.epochs) and saved_outputs:
        by_steps = train.max_steps and saved.global_step >= train.max_steps
        limit = f"train.max_steps {train.max_steps}" if by_steps else f"train.epochs {train.epochs}"
        raise AlreadyFinished(
            f"{cfg.run_dir}: already finished at step {saved.global_step} ({limit}); raise train.max_steps or "
            "train.epochs to train more, or pass --force without --resume to start over; nothing written"
        )
