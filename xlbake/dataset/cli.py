"""`xlbake dataset check | captions-from-filenames | tags | plan`: the guides' dataset preparation as commands.

Each command body is a few lines: call ``xlbake.dataset.tools``, print a table a person reads. ``check`` exits 1
with ``--strict`` when it finds problems; every command exits 1 with one line on a known error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import click

from xlbake.cli import force_option, run_guarded
from xlbake.data.kohya import LEFT_OUT_KINDS, PROBLEM_KINDS, read_dataset
from xlbake.data.steps import count_steps
from xlbake.dataset.tools import (
    DEFAULT_EXPOSURE,
    MAX_HASH_DISTANCE,
    MIN_PIXELS,
    captions_from_filenames,
    check_dataset,
    edit_tags,
    plan_folders,
    split_tags,
    tag_frequencies,
    token_counter,
)
from xlbake.fileio import check_output, write_text_atomic
from xlbake.tables import format_table

LISTED = 20
"""How many files a list prints before "... and N more"."""
KIND_ORDER = ("unreadable_image", "small_image", "near_duplicate", "long_caption", *PROBLEM_KINDS)
CAPTION_SOURCES = ("file", "filename", "file_or_filename", "file_or_folder")
CONTEXT = {"help_option_names": ["-h", "--help"]}


def extension_option(fn):
    return click.option("--extension", default=".txt", show_default=True, help="Caption file extension.")(fn)


def caption_source_option(fn):
    return click.option(
        "--caption-source",
        type=click.Choice(CAPTION_SOURCES),
        default="file",
        show_default=True,
        help="Where captions come from, as the finetune config's data.caption_source says.",
    )(fn)


@click.group(name="dataset", context_settings=CONTEXT)
def main() -> None:
    """Dataset tools: check a kohya-layout dataset, captions from file names, tags, repeats/steps plan."""


@main.command(context_settings=CONTEXT)
@click.argument("roots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--strict", is_flag=True, help="Exit with status 1 when any problem is found.")
@click.option(
    "--min-pixels",
    type=click.IntRange(1),
    default=MIN_PIXELS,
    show_default=True,
    help="Report images with fewer pixels (default: 640x1536, SDXL's smallest standard bucket, ~1024² in area).",
)
@click.option(
    "--tokenizer",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Diffusers folder (or tokenizer folder) whose CLIP tokenizer counts caption tokens. Default: SDXL's from "
    "the local Hugging Face cache if there, else an approximate count.",
)
@click.option("--max-tokens", type=click.Choice(["75", "150", "225"]), default="75", show_default=True)
@click.option(
    "--max-distance",
    type=click.IntRange(0, 64),
    default=MAX_HASH_DISTANCE,
    show_default=True,
    help="Near duplicates: images whose 64-bit perceptual hashes differ in at most this many bits.",
)
@click.option("--hash", "hasher", type=click.Choice(["phash", "dhash"]), default="phash", show_default=True)
@extension_option
@caption_source_option
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write findings as JSON."
)
@force_option
@run_guarded
def check(
    roots: tuple[Path, ...],
    strict: bool,
    min_pixels: int,
    tokenizer: Path | None,
    max_tokens: str,
    max_distance: int,
    hasher: str,
    extension: str,
    caption_source: str,
    json_out: Path | None,
    force: bool,
) -> None:
    """Find broken, too small and near-duplicate images, caption problems and folders without N_ repeats."""
    if json_out is not None:
        check_output(json_out, force)
    report = check_dataset(
        roots,
        counter=token_counter(tokenizer),
        min_pixels=min_pixels,
        max_tokens=int(max_tokens),
        max_distance=max_distance,
        hasher=hasher,
        caption_extension=_dotted(extension),
        caption_source=caption_source,
    )
    problems = sorted(report.problems, key=lambda p: (_kind_rank(p.kind), str(p.path)))
    if problems:
        rows = [(p.kind, _shown(p.path, roots), p.message) for p in problems]
        click.echo(format_table(("problem", "file", "detail"), rows))
        click.echo()
    click.echo(
        f"{report.n_images} image(s) found: {report.n_train} train, in {report.n_folders} N_name folder(s) "
        f"({report.n_images - report.n_train} left out: see the problems); caption tokens: {report.tokens}."
    )
    counts = Counter(p.kind for p in problems)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    click.echo(f"{len(problems)} problem(s): {summary}." if problems else "No problems found.")
    if json_out is not None:
        data = {
            "images": report.n_images,
            "train": report.n_train,
            "folders": report.n_folders,
            "tokens": report.tokens,
            "problems": [{"kind": p.kind, "path": str(p.path), "message": p.message} for p in problems],
        }
        write_text_atomic(json_out, json.dumps(data, indent=2) + "\n", force=force)
        click.echo(f"Wrote {json_out}.")
    if strict and problems:
        raise click.exceptions.Exit(1)


@main.command("captions-from-filenames", context_settings=CONTEXT)
@click.argument("root", type=click.Path(file_okay=False, exists=True, path_type=Path))
@extension_option
@click.option("--force", is_flag=True, help="Replace existing caption files.")
@run_guarded
def captions_command(root: Path, extension: str, force: bool) -> None:
    """Write each image's caption file from its file name (a " (2)" copy suffix is dropped), as the guide does."""
    result = captions_from_filenames(root, extension=_dotted(extension), force=force)
    click.echo(f"Wrote {len(result.written)} caption file(s).")
    _list(f"Kept {len(result.kept)} existing caption file(s); pass --force to replace them:", result.kept, root)
    _list(f"{len(result.empty)} image(s) whose name gives no caption (empty or generic like img06; rename them or "
          "write their caption files):", result.empty, root)  # fmt: skip
    _list_skipped(result.skipped, root)


@main.command(context_settings=CONTEXT)
@click.argument("root", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--add", default="", metavar="TAGS", help='Comma-separated tags to put first, e.g. --add "femme ewpp".')
@click.option("--remove", default="", metavar="TAGS", help="Comma-separated tags to remove (whole tags only).")
@click.option(
    "--keep",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Insert the added tags after this many leading tags (those caption.keep_tokens keeps first).",
)
@click.option("--freq", is_flag=True, help="List how many captions hold each tag.")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@extension_option
@run_guarded
def tags(root: Path, add: str, remove: str, keep: int, freq: bool, dry_run: bool, extension: str) -> None:
    """Add trigger words at the front, remove tags across a folder, list tag frequencies."""
    if not (add or remove or freq):
        raise click.UsageError("nothing to do: give --add, --remove and/or --freq")
    extension = _dotted(extension)
    if add or remove:
        edit = edit_tags(
            root, add=split_tags(add), remove=split_tags(remove), keep=keep, extension=extension, dry_run=dry_run
        )
        verb = "Would change" if dry_run else "Changed"
        click.echo(f"{verb} {len(edit.changed)} caption file(s); {edit.unchanged} unchanged.")
        if dry_run and edit.changed:
            rows = [(_shown(path, (root,)), old, new) for path, old, new in edit.changed[:LISTED]]
            click.echo(format_table(("file", "before", "after"), rows))
            if len(edit.changed) > LISTED:
                click.echo(f"... and {len(edit.changed) - LISTED} more")
        _list(f"{len(edit.no_caption)} image(s) without a caption file:", edit.no_caption, root)
        _list_skipped(edit.skipped, root)
    if freq:
        counts, n_captions = tag_frequencies(root, extension=extension)
        rows = [(str(n), f"{100 * n / n_captions:.0f}%", tag) for tag, n in counts]
        click.echo(format_table(("captions", "share", "tag"), rows) if rows else "No tags found.")
        click.echo(f"{len(counts)} distinct tag(s) in {n_captions} caption(s).")


@main.command(context_settings=CONTEXT)
@click.argument("roots", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Batch size per GPU.")
@click.option("--grad-accum", type=click.IntRange(1), default=3, show_default=True, help="Gradient accumulation.")
@click.option("--gpus", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--target-exposure",
    type=click.IntRange(1),
    default=None,
    help=f"Images x repeats per folder and epoch to balance concepts to (the guide's T method); default "
    f"{DEFAULT_EXPOSURE}. Suggestions are shown for several folders, or for one when this is given.",
)
@extension_option
@caption_source_option
@run_guarded
def plan(
    roots: tuple[Path, ...],
    epochs: int,
    batch: int,
    grad_accum: int,
    gpus: int,
    target_exposure: int | None,
    extension: str,
    caption_source: str,
) -> None:
    """Steps per folder and in total: images x repeats x epochs / batch / accumulation / GPUs."""
    scan = read_dataset(roots, caption_extension=_dotted(extension), caption_source=caption_source)
    folders = plan_folders(scan, target_exposure or DEFAULT_EXPOSURE)
    if not folders:
        raise click.ClickException("no N_name folder with captioned images found; run `xlbake dataset check` on it")
    divisor = batch * grad_accum * gpus
    suggest = len(folders) > 1 or target_exposure is not None
    headers = ("folder", "images", "repeats", "images x repeats", "steps")
    headers += ("suggested repeats", "or trim to") if suggest else ()
    rows = []
    for f in folders:
        row = (f.name, str(f.images), str(f.repeats), str(f.exposure), f"{f.exposure * epochs / divisor:.0f}")
        trim = f"{f.trim_images} x {f.trim_repeats}" if f.trim_images < f.images else ""
        rows.append(row + ((f"{f.suggested_repeats} (= {f.images * f.suggested_repeats})", trim) if suggest else ()))
    click.echo(format_table(headers, rows))
    setup = f"{epochs} epochs, batch {batch}, grad accum {grad_accum}, {gpus} GPU(s)"
    run = {"batch": batch, "grad_accum": grad_accum, "processes": gpus, "epochs": epochs}
    steps = count_steps([sum(f.exposure for f in folders)], **run)
    click.echo(f"T = {steps.samples_per_epoch} images x repeats per epoch; {setup}:")
    click.echo(f"  {steps.steps_per_epoch} optimizer steps per epoch, {steps.total_steps} in total.")
    if suggest:
        balanced = sum(f.images * f.suggested_repeats for f in folders)
        total = count_steps([balanced], **run).total_steps
        click.echo(f"With the suggested repeats: T = {balanced}, {total} steps in total (rename folders to N_name).")
    left_out = [p for p in scan.problems if p.kind in LEFT_OUT_KINDS]
    if left_out:
        click.echo(
            f"{len(left_out)} image(s) left out (unreadable, or without a usable caption) are not counted, as in "
            f"training; see `xlbake dataset check`."
        )
    if scan.ignored:
        click.echo(f"{len(scan.ignored)} image(s) outside N_name folders are never trained.")


def _list(title: str, paths: Sequence[Path], root: Path) -> None:
    if not paths:
        return
    click.echo(title)
    for path in paths[:LISTED]:
        click.echo(f"  {_shown(path, (root,))}")
    if len(paths) > LISTED:
        click.echo(f"  ... and {len(paths) - LISTED} more")


def _list_skipped(paths: Sequence[Path], root: Path) -> None:
    title = f"{len(paths)} folder(s)/image(s) outside N_name folders left alone (the finetune stage skips them):"
    _list(title, paths, root)


def _shown(path: Path, roots: Sequence[Path]) -> str:
    """``path`` relative to the root holding it."""
    for root in roots:
        if root in path.parents:
            return str(path.relative_to(root))
    return str(path)


def _kind_rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension
