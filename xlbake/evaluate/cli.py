"""``xlbake grid``, ``xlbake fidelity`` and ``xlbake loss-plot``: look at a run's results, then pick.

    xlbake grid --model BASE --model RUN/tuned.safetensors --lora RUN/lora-dim64.safetensors --weight 1 \\
        --weight 0.8 --captions data/ --out RUN/grid.png
    xlbake fidelity BASE RUN/tuned.fp32.safetensors RUN/lora-dim*.safetensors --captions data/
    xlbake fidelity BASE RUN/tuned.fp32.safetensors RUN/lora-dim*.safetensors --inputs dataset --dataset RUN
    xlbake loss-plot RUN
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from xlbake.cli import force_option, run_guarded, setup_logging
from xlbake.devices import resolve_device

DEVICES = "auto (cuda if available), cpu, cuda, cuda:N"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def prompt_options(fn):
    """``--prompt`` (repeatable), ``--prompts-file`` (one a line), ``--captions DATASET`` and ``--max-prompts``."""
    fn = click.option(
        "--max-prompts",
        type=click.IntRange(1),
        default=4,
        show_default=True,
        help="How many captions --captions picks (seeded).",
    )(fn)
    fn = click.option(
        "--captions",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Take prompts from the captions of this kohya-layout dataset folder.",
    )(fn)
    fn = click.option(
        "--prompts-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A text file with one prompt a line (# starts a comment line); a line may end with kohya's options "
        "--n negative, --w/--h size, --s steps, --l guidance, --d seed.",
    )(fn)
    return click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")(fn)


def model_options(fn):
    """``--components``, ``--device``, ``--dtype``."""
    fn = click.option(
        "--dtype",
        type=click.Choice(["auto", *DTYPES]),
        default="auto",
        show_default=True,
        help="Model precision: auto = fp32 on the CPU, fp16 on a GPU.",
    )(fn)
    fn = click.option("--device", default="auto", show_default=True, help=f"Device: {DEVICES}.")(fn)
    return click.option(
        "--components",
        default=None,
        help="Diffusers SDXL folder (or cached hub id) giving configs and tokenizers for single files "
        "of an unknown size; not needed for diffusers folders, the real SDXL or the builtin tiny model.",
    )(fn)


@click.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Checkpoint (single .safetensors or diffusers folder), one column group each; e.g. the base, "
    "RUN/checkpoints/epoch-*.safetensors, RUN/tuned.safetensors. Repeatable.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="LoRA file (repeatable): one column per LoRA and weight on the first --model, the base the LoRA was "
    "extracted against; the other models get one column each, as they are (see --lora-on-tuned).",
)
@click.option(
    "--lora-on-tuned",
    is_flag=True,
    help="Also apply every --lora to the models after the first (e.g. a LoRA on top of the finetune itself).",
)
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    default=(1.0,),
    show_default=True,
    help="LoRA weight (repeatable), e.g. --weight 1 --weight 0.8 --weight 0.6.",
)
@click.option("--without-lora", is_flag=True, help="Also a column without LoRA for each model given LoRAs.")
@prompt_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Grid PNG; single images go to a folder of the same name without .png.",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Denoising steps [default: 30; 20 on the CPU].")
@click.option("--cfg", "guidance_scale", type=float, default=5.0, show_default=True, help="Guidance scale.")
@click.option("--width", type=click.IntRange(8), default=None, help="Image width [default: 1024; 512 on the CPU].")
@click.option("--height", type=click.IntRange(8), default=None, help="Image height [default: 1024; 512 on the CPU].")
@click.option("--seed", type=int, default=0, show_default=True, help="Row r uses seed + r in every column.")
@click.option("--negative", default="", help="Negative prompt.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@model_options
@force_option
@run_guarded
def grid(
    models,
    loras,
    lora_on_tuned,
    weights,
    without_lora,
    prompts,
    prompts_file,
    captions,
    max_prompts,
    out,
    steps,
    guidance_scale,
    width,
    height,
    seed,
    negative,
    batch_size,
    components,
    device,
    dtype,
    force,
) -> None:
    """Sample grid: rows = prompts, columns = the base (first model) x LoRAs x weights and the other models, fixed
    seeds, one labelled PNG."""
    from xlbake.evaluate.grid import SampleSettings, grid_columns, save_grid
    from xlbake.evaluate.render import render_grid, sample_defaults
    from xlbake.fileio import check_output

    setup_logging()
    check_output(out, force)
    rows = _prompts(prompts, prompts_file, captions, max_prompts, seed)
    device = resolve_device(device)
    steps, width, height, note = sample_defaults(device, steps=steps, width=width, height=height)
    if note:
        click.echo(f"Note: {note}", err=True)
    settings = SampleSettings(steps, guidance_scale, width, height, seed, negative, batch_size)
    columns = grid_columns(models, loras, weights, without_lora=without_lora, lora_on_tuned=lora_on_tuned)
    cells = render_grid(columns, rows, settings, components=components, device=device, dtype=_dtype(dtype))
    title = f"row r: seed {seed} + r, {steps} steps, guidance {guidance_scale:g}, {width}x{height}"
    written = save_grid(cells, rows, columns, out, settings=settings, title=title, force=force)
    click.echo(
        f"wrote {written[0]} ({len(rows)} x {len(columns)}) and {len(written) - 1} images in {out.with_suffix('')}"
    )


@click.command()
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("tuned", type=click.Path(exists=True, path_type=Path))
@click.argument("loras", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@prompt_options
@click.option("--samples", type=click.IntRange(1), default=8, show_default=True, help="Fixed inputs to compare on.")
@click.option(
    "--inputs",
    "input_kind",
    type=click.Choice(["random", "dataset"]),
    default="random",
    show_default=True,
    help="random: --samples noisy random latents and the prompts; dataset: the --dataset images of --split, "
    "VAE-encoded and noised, each with its own caption.",
)
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    default=None,
    help="With --inputs dataset: a finetune run folder (its dataset and resolution) or a kohya dataset root.",
)
@click.option(
    "--split",
    type=click.Choice(["heldout", "calibration", "all"]),
    default="heldout",
    show_default=True,
    help="With --inputs dataset: the images extract --calibrate did not use (heldout), those it did, or all.",
)
@click.option("--per-image", type=click.IntRange(1), default=2, show_default=True, help="Noise levels per image.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--latent-size", type=click.IntRange(8), default=None, help="Latent side (default: the UNet's).")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Plot PNG (a .json with the numbers beside it); default: fidelity.png beside the first LoRA.",
)
@model_options
@force_option
@run_guarded
def fidelity(
    base,
    tuned,
    loras,
    prompts,
    prompts_file,
    captions,
    max_prompts,
    samples,
    input_kind,
    dataset,
    split,
    per_image,
    seed,
    latent_size,
    batch_size,
    out,
    components,
    device,
    dtype,
    force,
) -> None:
    """How much of the finetune (BASE -> TUNED) each LORA keeps, in function space and in weight space."""
    from xlbake.evaluate.fidelity import fidelity_table, measure_fidelity
    from xlbake.evaluate.plots import plot_kept_effect
    from xlbake.fileio import check_output, write_text_atomic

    setup_logging()
    out = out or loras[0].with_name("fidelity.png")
    check_output(out, force)
    check_output(out.with_suffix(".json"), force)
    if input_kind == "dataset" and (prompts or prompts_file or captions):
        raise click.UsageError("--inputs dataset prompts each image with its caption: drop the prompt options")
    groups, described = _fidelity_inputs(base, input_kind, dataset, split, per_image, seed, components, device)
    results = measure_fidelity(
        base,
        tuned,
        loras,
        n_samples=samples,
        seed=seed,
        device=resolve_device(device),
        prompts=_prompts(prompts, prompts_file, captions, max_prompts, seed, required=False),
        components=components,
        dtype=_dtype(dtype),
        latent_size=latent_size,
        batch_size=batch_size,
        inputs=groups,
    )
    click.echo(fidelity_table(results))
    plot_kept_effect(results, out, title=f"what each LoRA keeps of {tuned.name}", force=force)
    document = {
        "base": str(base),
        "tuned": str(tuned),
        "samples": samples,
        "seed": seed,
        "inputs": described,
        "results": [r.as_dict() for r in results],
    }
    write_text_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n", force=force)
    click.echo(f"wrote {out} and {out.with_suffix('.json')}")


def _fidelity_inputs(base, kind, dataset, split, per_image, seed, components, device) -> tuple[tuple, dict]:
    """The dataset inputs ``--inputs dataset`` asks for (empty: random ones) and their description for the JSON."""
    if kind == "random":
        if dataset is not None:
            raise click.UsageError("--dataset is read only with --inputs dataset")
        return (), {"kind": "random"}
    if dataset is None:
        raise click.UsageError("--inputs dataset needs --dataset RUN_OR_DATASET_ROOT")
    from xlbake.evaluate.fidelity_inputs import dataset_inputs

    found = dataset_inputs(
        base, dataset, split=split, per_image=per_image, seed=seed, components=components, device=resolve_device(device)
    )
    click.echo(f"inputs: {len(found.images)} {split} images of {dataset} x {per_image} noise levels, own captions")
    described = {"kind": "dataset", "dataset": str(dataset), "split": split, "per_image": per_image}
    return found.groups, {**described, "images": [str(path) for path in found.images]}


@click.command("loss-plot")
@click.argument("log", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write; default: loss-curve.png in the run folder (or beside the log file).",
)
@click.option("--smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True)
@force_option
@run_guarded
def loss_plot(log, out, smoothing, force) -> None:
    """Loss curve of a run (raw and smoothed, LR on a second axis) from RUN, its tensorboard logs or a JSONL log."""
    from xlbake.evaluate.plots import plot_loss_curve, read_loss_log

    out = out or (log / "loss-curve.png" if log.is_dir() else log.with_name("loss-curve.png"))
    title = f"training loss: {log.resolve().name}"
    click.echo(f"wrote {plot_loss_curve(read_loss_log(log), out, title=title, smoothing=smoothing, force=force)}")


def _prompts(prompts, prompts_file, captions, limit: int, seed: int, required: bool = True) -> list[str]:
    """The given prompts, then the file's lines, then ``limit`` dataset captions; UsageError if none and required."""
    found = list(prompts)
    if prompts_file is not None:
        lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
        found += [line for line in lines if line and not line.startswith("#")]  # "#": a comment, as in kohya's
    if captions is not None:
        from xlbake.evaluate.fidelity import prompts_from_dataset

        found += prompts_from_dataset(captions, limit, seed)
    if required and not found:
        raise click.UsageError("no prompts: give --prompt, --prompts-file or --captions")
    return found


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, DTYPES[name])
