"""``xlbake batch``: the command line of the local pool (:mod:`xlbake.batch.runner`) and of SLURM submission
(:mod:`xlbake.batch.slurm`), which share the concept -> make chain."""

from __future__ import annotations

from pathlib import Path

import click

from xlbake.batch import slurm as cluster
from xlbake.batch.runner import BatchSettings, parse_gpus, run_batch, select_concepts
from xlbake.batch.summary import SUMMARY_JSON, SUMMARY_MD, render_markdown
from xlbake.cli import EXIT_INTERRUPTED, run_guarded
from xlbake.errors import ConfigError


@click.command(name="batch", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("concepts", nargs=-1)
@click.option("--all", "all_concepts", is_flag=True, help="Every concept YAML in the concepts folder.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Concepts at once (default: 1, or one per GPU slot).")
@click.option("--gpus", metavar="0,1|0+1,2+3", help="GPU pool: one concept per slot via CUDA_VISIBLE_DEVICES.")
@click.option("-C", "--project", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              help="Project folder (with the Makefile).")  # fmt: skip
@click.option("--concepts-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: PROJECT/concepts.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: PROJECT/runs.")
@click.option("--make-arg", "make_args", multiple=True, metavar="ARG",
              help="Extra argument for each concept's make, e.g. DIM=64 or -k. Repeatable.")  # fmt: skip
@click.option("--slurm", is_flag=True, help="Submit one SLURM job per concept (sbatch) instead of running here.")
@click.option("--status", is_flag=True, help="With --slurm: the submitted jobs' states into the summary.")
@click.option("--partition", help="--slurm: the jobs' partition.")
@click.option("--gpus-per-job", type=click.IntRange(min=1), help="--slurm: GPUs per job (--gres=gpu:N).")
@click.option("--time", "time_limit", metavar="D-HH:MM:SS", help="--slurm: each job's time limit.")
@click.option("--account", help="--slurm: the account charged.")
@click.option("--sbatch", "sbatch_lines", multiple=True, metavar="OPTION",
              help="--slurm: another #SBATCH line, e.g. --mem=64G. Repeatable.")  # fmt: skip
@run_guarded
def main(
    concepts: tuple[str, ...], all_concepts: bool, jobs: int | None, gpus: str | None, project: Path,
    concepts_dir: Path | None, runs_dir: Path | None, make_args: tuple[str, ...], slurm: bool, status: bool,
    partition: str | None, gpus_per_job: int | None, time_limit: str | None, account: str | None,
    sbatch_lines: tuple[str, ...],
) -> None:  # fmt: skip
    """Run the finetune -> extract -> resize chain of each CONCEPT (names in concepts/ or YAML paths)."""
    project = project.absolute()
    if not (project / "Makefile").is_file():
        raise ConfigError(f"{project}: no Makefile; run xlbake batch in the project folder or pass -C PROJECT")
    concepts_dir = (concepts_dir or project / "concepts").absolute()
    runs_dir = (runs_dir or project / "runs").absolute()
    if slurm or status:
        options = cluster.SlurmSettings(partition, gpus_per_job, time_limit, account, extra=sbatch_lines)
        cluster.main(concepts, all_concepts, status, concepts_dir, BatchSettings(project, runs_dir, make_args), options)
        return
    paths = select_concepts(concepts, all_concepts, concepts_dir)
    slots = parse_gpus(gpus)
    jobs = jobs or max(1, len(slots))
    if slots and jobs > len(slots):
        raise ConfigError(f"--jobs {jobs} exceeds the {len(slots)} GPU slots of --gpus {gpus}")
    settings = BatchSettings(project, runs_dir, make_args, stream=jobs == 1)
    results = run_batch(paths, settings, jobs=jobs, gpus=slots[:jobs])
    summary = f"{runs_dir / SUMMARY_MD} and {runs_dir / SUMMARY_JSON}"
    click.echo("\n" + render_markdown(results) + f"\nSummary of every concept in {runs_dir}: {summary}")
    if any(r.status == "interrupted" for r in results):
        click.echo("Interrupted; run the same command again to continue (finished stages are kept).", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if any(r.status != "ok" for r in results):
        raise click.exceptions.Exit(1)


if __name__ == "__main__":
    main(prog_name="python -m xlbake.batch.cli")
