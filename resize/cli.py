"""``python -m resize`` / ``xlbake resize``: smaller LoRAs from one LoRA, exactly, in factor space.

python -m resize --lora lora-dim128.safetensors --rank 8,16,32 --out lora.safetensors   # lora-r8/-r16/-r32
python -m resize --lora IN.safetensors --method sv_fro --value 0.9 --rank 64 --out OUT.safetensors
python -m resize --lora IN.safetensors --size 25MB,50MB --out "lora-{size}.safetensors"
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import click

from resize.config import ResizeConfig
from xlbake.cli import config_options, force_option, resolve_config, run_guarded, setup_logging
from xlbake.errors import ConfigError

# CLI option -> config key; values go through the config's validation (so bad values are one line, exit 1).
_SCALAR_OPTIONS = {
    "lora": "lora",
    "out": "out",
    "conv_rank": "conv_rank",
    "method": "method",
    "value": "value",
    "alpha": "alpha",
    "save_precision": "save_precision",
    "device": "device",
    "calibration": "calibration",
    "calibrate_convs": "calibrate_convs",
}
_LIST_OPTIONS = {"rank": "rank", "size": "size"}


@click.command(name="resize", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lora", metavar="IN.safetensors", help="kohya-format LoRA to resize.")
@click.option(
    "--out",
    metavar="OUT.safetensors",
    help="Output file. Several ranks/sizes: a {rank}/{size} placeholder is filled in, else -r{rank}/-{size} is added.",
)
@click.option("--rank", metavar="R[,R...]", help="Rank of Linear/1x1 modules, one file per value (e.g. 8,16,32).")
@click.option("--conv-rank", metavar="R", help="Rank of 3x3 conv (LoCon) modules; default: --rank.")
@click.option("--method", metavar="NAME", help="fixed (default), sv_ratio, sv_fro or sv_cumulative (then --rank caps).")
@click.option("--value", metavar="X", help="Criterion of a dynamic method (sv_ratio 4, sv_fro 0.9, sv_cumulative 0.6).")
@click.option("--size", metavar="SIZE[,SIZE...]", help="Global budgets: 50MB, 1.5GB or 20M parameters; one file each.")
@click.option("--alpha", metavar="A", help="The one alpha written for every module; default: the largest rank.")
@click.option("--save-precision", metavar="P", help="fp16 (default), bf16 or fp32.")
@click.option("--device", metavar="D", help="cpu (default), cuda, cuda:N or mps.")
@click.option("--calibration", metavar="FILE", help="Input statistics (extract --calibrate): whitened resize.")
@click.option("--calibrate-convs", is_flag=True, default=None, help="With --calibration, whiten the 3x3 convs too.")
@click.option("--no-report", is_flag=True, help="Do not write the .report.json/.report.png beside each output.")
@config_options
@force_option
@run_guarded
def main(config: Path | None, overrides: tuple[str, ...], dry_run: bool, force: bool, **options: object) -> None:
    """Resize a LoRA's ranks in factor space (fixed, per-layer criterion or size budget), one file per target."""
    cfg = resolve_config(ResizeConfig, config, overrides, dry_run, flags=option_overrides(options))
    from resize.pipeline import run_resize  # torch only once the arguments are known to be good
    from xlbake.lora.report import BYTES_PER_MB, group_stat, print_summary

    setup_logging()
    for result in run_resize(cfg, force=force, progress=True):
        total = group_stat(result.layers)
        click.echo(
            f"wrote {result.path} ({result.file_bytes / BYTES_PER_MB:.2f} MB, {total.modules} modules, "
            f"rank {total.ranks}, kept {total.kept * 100:.2f} % of the input's energy)"
        )
        click.echo(print_summary(result.layers, {"save_precision": cfg.save_precision}, result.coverage))


def option_overrides(options: Mapping[str, object]) -> list[str]:
    """Given command-line options as ``key=value`` overrides (values as JSON strings, so YAML keeps them text)."""
    overrides = [f"{key}={json.dumps(options[name])}" for name, key in _SCALAR_OPTIONS.items() if options[name]]
    for name, key in _LIST_OPTIONS.items():
        if options[name]:
            items = [item.strip() for item in str(options[name]).split(",")]
            if name == "rank":
                items = [_rank(item) for item in items]
            overrides.append(f"{key}={json.dumps(items)}")
    if options["no_report"]:
        overrides.append("report=false")
    return overrides


def _rank(text: str) -> int:
    """One --rank value as an integer; a ConfigError naming --rank (not the --set it becomes) otherwise."""
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--rank: {text!r} is not a rank; give whole numbers like 8 or 8,16,32") from None

