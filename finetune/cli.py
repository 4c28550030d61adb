"""`python -m finetune --config C [--set k=v] [--dry-run] [--resume auto|PATH] [--force]` (also `xlbake finetune`)."""

from __future__ import annotations

from pathlib import Path

import click

from xlbake.cli import EXIT_INTERRUPTED, config_options, force_option, resolve_config, run_guarded, setup_logging


@click.command(name="finetune", context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.option(
    "--resume",
    metavar="auto|PATH",
    default=None,
    help="Continue a run: `auto` = the newest state in RUN/state (or start if there is none), or a state folder.",
)
@force_option
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, library messages included.")
@run_guarded
def main(
    config: Path | None, overrides: tuple[str, ...], dry_run: bool, resume: str | None, force: bool, verbose: bool
) -> None:
    """Full SDXL finetune (UNet and both text encoders, optional EMA) into RUN (run_dir)."""
    from finetune.config import FinetuneConfig

    cfg = resolve_config(FinetuneConfig, config, overrides, dry_run)
    setup_logging(verbose)
    from finetune.distributed import check_launch, prepare_run_dir_once
    from finetune.trainer import run

    check_launch(cfg)  # e.g. EMA under DeepSpeed ZeRO-3, refused before anything is loaded or written
    prepare_run_dir_once(cfg, resume=resume is not None, force=force)
    result = run(cfg, resume)
    if result.interrupted:
        click.echo(f"Interrupted at step {result.global_step}; state saved in {result.state_dir}.", err=True)
        click.echo(
            f"Resume with: python -m finetune --config {cfg.run_dir}/config.resolved.yaml --resume auto", err=True
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    click.echo(f"Finished {result.global_step} steps; outputs:")
    for path in result.outputs:
        click.echo(f"  {path}")
