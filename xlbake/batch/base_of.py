"""`python -m xlbake.batch.base_of RUN`: print the base model path a run was trained from (for make's extract step)."""

from __future__ import annotations

from pathlib import Path

import click

from xlbake.batch.run_folder import BASE_TXT
from xlbake.cli import run_guarded
from xlbake.errors import InputError


def base_of(run_dir: Path) -> Path:
    """The base model path recorded in ``RUN/base.txt``; InputError if the run has not finished."""
    record = Path(run_dir) / BASE_TXT
    try:
        text = record.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputError(
            f"{record}: cannot read ({exc.strerror}); finish the finetune run first (make finetune)"
        ) from None
    if not text:
        raise InputError(f"{record}: empty; rerun the finetune run to record its base model")
    return Path(text)


@click.command(name="base_of")
@click.argument("run_dir", type=click.Path(path_type=Path))
@run_guarded
def main(run_dir: Path) -> None:
    """Print the base model path of the finetune run in RUN_DIR."""
    click.echo(str(base_of(run_dir)))


if __name__ == "__main__":
    main(prog_name="python -m xlbake.batch.base_of")
