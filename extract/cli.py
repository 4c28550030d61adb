"""``python -m extract --base B --tuned T --out O [--dim 16,32] ...`` (also ``xlbake extract``).

Flags override ``--config`` keys and ``--set`` overrides; every flag is a config key of ``ExtractConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from extract.config import ExtractConfig
from xlbake.cli import config_options, force_option, resolve_config, run_guarded


def _ranks(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """ "16,32,64" -> [16, 32, 64]."""
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected ranks like 32 or 16,32,64, got {value!r}") from None


FLAGS = {  # flag -> (config key, click option keyword arguments)
    "--base": (
        "base",
        {"type": click.Path(path_type=Path), "help": "Base model: SDXL .safetensors or diffusers folder."},
    ),
    "--tuned": ("tuned", {"type": click.Path(path_type=Path), "help": "Finetuned model, same architecture."}),
    "--out": ("out", {"type": click.Path(path_type=Path), "help": "Output LoRA .safetensors."}),
    "--dim": (
        "dim",
        {"callback": _ranks, "metavar": "N[,N...]", "help": "Linear/1x1 rank(s), e.g. 32 or 16,32,64 (one file each)."},
    ),
    "--conv-dim": (
        "conv_dim",
        {"callback": _ranks, "metavar": "N[,N...]", "help": "3x3 conv rank(s) (LoCon); 0 = no conv layers."},
    ),
    "--rank-method": (
        "rank_method",
        {"type": click.Choice(["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]), "help": "Per-layer rank choice."},
    ),
    "--rank-value": ("rank_value", {"type": float, "help": "Parameter of --rank-method."}),
    "--size": ("size", {"metavar": "SIZE", "help": "Global budget: file size (100MB) or parameter count (50M)."}),
    "--svd": ("svd", {"type": click.Choice(["fast", "exact"]), "help": "Randomized (fast) or LAPACK (exact) SVD."}),
    "--precision": ("precision", {"type": click.Choice(["fp32", "fp64"]), "help": "Precision of the SVD."}),
    "--power-iters": ("power_iters", {"type": int, "help": "Krylov blocks the fast SVD always builds (3 at least)."}),
    "--oversample": ("oversample", {"type": int, "help": "Oversampling of the fast SVD."}),
    "--seed": ("seed", {"type": int, "help": "Seed of the fast SVD."}),
    "--clamp-quantile": ("clamp_quantile", {"type": float, "help": "kohya's factor clamp (kohya: 0.99); 1 = none."}),
    "--save-precision": ("save_precision", {"type": click.Choice(["fp16", "bf16", "fp32"]), "help": "LoRA dtype."}),
    "--extra-layers/--no-extra-layers": (
        "extra_layers",
        {"default": None, "help": "Also extract time/label embeddings (and conv_in/out with a conv dim)."},
    ),
    "--min-diff": ("min_diff", {"type": float, "help": "Skip a component whose relative difference is below this."}),
    "--allow-swapped/--no-allow-swapped": (
        "allow_swapped",
        {"default": None, "help": "Extract even if --base's metadata says it is a finetune of --tuned."},
    ),
    "--calibration": (
        "calibration",
        {"type": click.Path(path_type=Path), "help": "Activation statistics file: calibrated (activation-aware) SVD."},
    ),
    "--calibrate": (
        "calibrate",
        {"type": click.Path(path_type=Path), "help": "Finetune run folder: compute/reuse RUN/calibration.safetensors."},
    ),
    "--calibrate-convs/--no-calibrate-convs": (
        "calibrate_convs",
        {"default": None, "help": "With calibration, also whiten the 3x3 convs (off: measured worse)."},
    ),
    "--device": ("device", {"metavar": "DEVICE", "help": "cpu, cuda or cuda:N."}),
}


def _flag_options(fn):
    for flag, (key, kwargs) in reversed(FLAGS.items()):
        fn = click.option(*flag.split(" "), key, **kwargs)(fn)
    return fn


def flag_overrides(values: dict[str, object]) -> list[str]:
    """Given flags as ``key=value`` overrides (JSON is valid YAML); paths made absolute against the working folder."""
    overrides = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value.absolute())
        overrides.append(f"{key}={json.dumps(value)}")
    return overrides


@click.command(name="extract", context_settings={"help_option_names": ["-h", "--help"]})
@_flag_options
@config_options
@force_option
@run_guarded
def main(config: Path | None, overrides: tuple[str, ...], dry_run: bool, force: bool, **flags: object) -> None:
    """Extract a kohya LoRA from BASE and TUNED SDXL checkpoints by SVD, streaming one layer at a time."""
    from extract.pipeline import run_extract  # torch and the models load only when there is work to do

    cfg = resolve_config(ExtractConfig, config, overrides, dry_run, flags=flag_overrides(flags))
    run_extract(cfg, force=force, echo=click.echo)
