"""`python -m finetune.epochs RUN`: the run's saved checkpoints a LoRA can be extracted from, for make's
extract-epochs: one ``TAG=PATH`` line per checkpoint tag (``epoch-0002``, ``step-00000500``, ``...-raw``), sorted.

Extraction needs fp32 weights (an fp16 file rounds away most of a low-LR finetune's text-encoder change): a tag's
``{tag}.fp32.safetensors`` (``checkpoint.keep_fp32``), else its ``{tag}.safetensors`` when that is fp32
(``checkpoint.dtype: fp32``). Tags with neither are left out with a note on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click
from safetensors import SafetensorError, safe_open

from xlbake.batch.run_folder import CHECKPOINTS, FP32_SUFFIX, SAFETENSORS
from xlbake.cli import run_guarded
from xlbake.errors import InputError
from xlbake.fileio import TEMP_PREFIX

FP32 = "F32"


def epoch_checkpoints(run_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """((tag, fp32 file) of every checkpoint in ``RUN/checkpoints`` sorted by tag, tags left out for lack of an
    fp32 file); InputError when no checkpoint can be extracted, saying which settings save them."""
    folder = Path(run_dir) / CHECKPOINTS
    files = sorted(p for p in folder.glob(f"*{SAFETENSORS}") if not p.name.startswith(TEMP_PREFIX))
    copies = {p.name.removesuffix(FP32_SUFFIX): p for p in files if p.name.endswith(FP32_SUFFIX)}
    plain = {p.name.removesuffix(SAFETENSORS): p for p in files if not p.name.endswith(FP32_SUFFIX)}
    found, skipped = [], []
    for tag in sorted(copies.keys() | plain.keys()):
        if tag in copies:
            found.append((tag, copies[tag]))
        elif _is_fp32(plain[tag]):
            found.append((tag, plain[tag]))
        else:
            skipped.append(tag)
    if not found:
        what = f"only non-fp32 checkpoints ({', '.join(skipped)})" if skipped else "no checkpoint"
        raise InputError(
            f"{folder}: {what} to extract from; train with checkpoint.every_epochs (or every_steps) and "
            "checkpoint.keep_fp32: true to save fp32 checkpoints"
        )
    return found, skipped


def _is_fp32(path: Path) -> bool:
    """Whether the checkpoint's first tensor is stored in fp32 (a checkpoint has one dtype throughout)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
            return bool(keys) and handle.get_slice(keys[0]).get_dtype() == FP32
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc}); delete it or rerun the finetune") from None


@click.command(name="epochs")
@click.argument("run_dir", type=click.Path(path_type=Path))
@run_guarded
def main(run_dir: Path) -> None:
    """Print TAG=PATH for every fp32 checkpoint of the finetune run in RUN_DIR."""
    found, skipped = epoch_checkpoints(run_dir)
    if skipped:
        click.echo(
            f"note: no fp32 copy of {', '.join(skipped)}: not extracted (checkpoint.keep_fp32: true saves one)",
            err=True,
        )
    for tag, path in found:
        click.echo(f"{tag}={path}")


if __name__ == "__main__":
    main(prog_name="python -m finetune.epochs")
