"""Pictures a person would rather look at than read: the loss curve of a run and what each LoRA keeps of its
finetune against its file size. (Kept energy vs rank per component is :mod:`xlbake.lora.report`'s; the sample-grid sheet
:mod:`xlbake.evaluate.sheet`'s.)

Figures are drawn with matplotlib's object API (no pyplot state) and written atomically via :mod:`xlbake.fileio`.
The loss curve reads what the trainer writes: tensorboard event files (``RUN/logs/``, tags ``loss`` and
``lr/<part>``) or, without them, the loss history in the newest ``RUN/state/step-*/trainer_state.json``; a JSONL
log (one ``{"step": .., "loss": .., "lr": ..}`` object a line) is read too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

from xlbake.batch.run_folder import STATE_FILE
from xlbake.errors import InputError
from xlbake.fileio import atomic_path

if TYPE_CHECKING:
    from xlbake.evaluate.fidelity import FidelityResult

PLOT_DPI = 120
SMOOTHING = 0.9
"""Exponential smoothing of the loss curve (tensorboard's default slider value)."""
LR_STYLES = (("--", "o"), (":", "s"), ("-.", "^"), ((0, (5, 1, 1, 1, 1, 1)), "D"))
"""Line style and marker of each learning-rate line, so that lines of different parameter groups stay apart."""
LR_MARKERS = 12
"""About this many markers on each learning-rate line."""
EVENTS_PREFIX = "events.out.tfevents."


# ---------------------------------------------------------------------------------------------------------------
# Loss curve


@dataclass(frozen=True)
class Series:
    """Values by optimizer step, steps ascending."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class LossLog:
    """A run's logged training loss and learning rate(s) (by parameter group, e.g. ``unet``, ``te1``)."""

    loss: Series
    lrs: dict[str, Series]
    source: Path


def smooth(values: Sequence[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average, as tensorboard smooths: same length as ``values``."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        out.append(average / (1 - factor**count))
    return out


def read_loss_log(path: str | os.PathLike) -> LossLog:
    """Read a run's loss log: a run folder, a tensorboard events file or folder, a trainer_state.json or a JSONL.

    A run folder is read from its tensorboard events if any, else from its newest saved training state.
    InputError if nothing readable is found or it holds no loss.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; pass a run folder, tensorboard log or JSONL log")
    if path.is_dir():
        events = sorted(path.rglob(EVENTS_PREFIX + "*"))
    else:
        events = [path] if path.name.startswith(EVENTS_PREFIX) else []
    if events:
        scalars = _read_events(events)
    elif path.suffix == ".jsonl":
        scalars = _read_jsonl(path)
    else:
        states = [path] if path.is_file() else sorted(path.rglob(STATE_FILE), key=lambda p: p.parent.name)
        if not states:
            raise InputError(f"{path}: no tensorboard events, {STATE_FILE} or .jsonl log found; was logging enabled?")
        scalars = _read_state(states[-1])
    loss = scalars.pop("loss", {})
    finite = {step: value for step, value in loss.items() if math.isfinite(value)}
    if not finite:
        raise InputError(f"{path}: the log holds no finite loss values")
    lrs = {name.removeprefix("lr/"): _series(values) for name, values in scalars.items() if name.startswith("lr")}
    return LossLog(_series(finite), lrs, path)


def plot_loss_curve(
    log: LossLog, out_png: str | os.PathLike, *, title: str | None = None, smoothing: float = SMOOTHING, force: bool
) -> Path:
    """Training loss per optimizer step, raw and smoothed, with the learning rate(s) on a second axis."""
    return _save(loss_figure(log, title=title, smoothing=smoothing), out_png, force)


def loss_figure(log: LossLog, *, title: str | None = None, smoothing: float = SMOOTHING) -> Figure:
    """The figure of :func:`plot_loss_curve`."""
    figure = Figure(figsize=(9, 4.8), dpi=PLOT_DPI, layout="constrained")
    axis = figure.subplots()
    steps, values = log.loss.steps, log.loss.values
    axis.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8, label="loss (per step)")
    axis.plot(steps, smooth(values, smoothing), color="C0", linewidth=2.0, label=f"loss (smoothed, EMA {smoothing:g})")
    axis.set(xlabel="optimizer step", ylabel="training loss (mean per step)")
    axis.set_title(title or f"training loss: {log.source}")
    axis.grid(True, alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if log.lrs:
        lr_axis = axis.twinx()
        for index, (names, series) in enumerate(_distinct(log.lrs).items()):
            label = f"learning rate ({' = '.join(names)})" if names != ("lr",) else "learning rate"
            style, marker = LR_STYLES[index % len(LR_STYLES)]
            every = (index, max(1, len(series.steps) // LR_MARKERS))  # markers of different groups side by side
            lr_axis.plot(
                series.steps,
                series.values,
                color=f"C{index + 1}",
                linewidth=1.2,
                linestyle=style,
                label=label,
                marker=marker,
                markevery=every,
                markersize=4,
            )
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more_handles, more_labels = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # below the axes: inside, the LR axis would draw its lines over the legend, and the legend over the curves
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize="small")
    return figure


def _distinct(lrs: dict[str, Series]) -> dict[tuple[str, ...], Series]:
    """The LR series with identical ones merged under all their names: one line each, none hidden under another."""
    groups: dict[Series, tuple[str, ...]] = {}
    for name, series in lrs.items():
        groups[series] = (*groups.get(series, ()), name)
    return {names: series for series, names in groups.items()}


def _series(values: dict[int, float]) -> Series:
    steps = sorted(values)
    return Series(tuple(steps), tuple(float(values[step]) for step in steps))


def _read_events(files: Sequence[Path]) -> dict[str, dict[int, float]]:
    """Scalars of tensorboard event files; a step logged twice (a resumed run) keeps its most recent value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    timed: dict[str, dict[int, tuple[float, float]]] = {}
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            steps = timed.setdefault(tag, {})
            for event in events.Scalars(tag):
                if event.step not in steps or event.wall_time >= steps[event.step][0]:
                    steps[event.step] = (event.wall_time, event.value)
    return {tag: {step: value for step, (_, value) in steps.items()} for tag, steps in timed.items()}


def _read_jsonl(path: Path) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}:{number}: not a JSON object with a step ({exc}); fix or remove the line") from exc
        for key, value in record.items():
            if (key == "loss" or key.startswith("lr")) and isinstance(value, (int, float)):
                scalars.setdefault(key, {})[step] = float(value)
    return scalars


def _read_state(path: Path) -> dict[str, dict[int, float]]:
    """Loss and LR history of a trainer_state.json: step i + 1 for the i-th entry."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        losses, lrs = list(state.get("losses", [])), list(state.get("lrs", []))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise InputError(f"{path}: not a readable training state ({exc})") from exc
    scalars = {"loss": {i + 1: float(v) for i, v in enumerate(losses) if isinstance(v, (int, float))}}
    if lrs:
        scalars["lr"] = {i + 1: float(v) for i, v in enumerate(lrs) if isinstance(v, (int, float))}
    return scalars


# ---------------------------------------------------------------------------------------------------------------
# Kept effect vs file size


def plot_kept_effect(
    results: Sequence[FidelityResult], out_png: str | os.PathLike, *, title: str | None = None, force: bool = False
) -> Path:
    """Kept effect (function space) and kept weight energy of each LoRA file against its size, one point per file."""
    return _save(kept_effect_figure(results, title), out_png, force)


def kept_effect_figure(results: Sequence[FidelityResult], title: str | None = None) -> Figure:
    """The figure of :func:`plot_kept_effect`."""
    if not results:
        raise ValueError("plot_kept_effect: no results to plot")
    ordered = sorted(results, key=lambda r: r.file_mb)
    sizes = [r.file_mb for r in ordered]
    effect = [r.kept_effect * 100 for r in ordered]
    energy = [r.kept_energy * 100 for r in ordered]
    figure = Figure(figsize=(8, 5), dpi=PLOT_DPI, layout="constrained")
    axis = figure.subplots()
    axis.plot(
        sizes, effect, "o-", color="C0", label="kept effect: 1 - ‖ε(base+LoRA) - ε(tuned)‖² / ‖ε(base) - ε(tuned)‖²"
    )
    axis.plot(sizes, energy, "s--", color="C1", label="kept weight energy: 1 - ‖ΔW(LoRA) - ΔW‖² / ‖ΔW‖²")
    if len(sizes) > 1 and max(sizes) > 10 * min(sizes) > 0:
        axis.set_xscale("log")
    axis.set_ylim(min(0.0, *effect, *energy) - 2, 102)
    axis.set(xlabel="LoRA file size (MB, 10⁶ bytes)", ylabel="kept (%)")
    axis.set_title(title or "what each LoRA keeps of the finetune")
    axis.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", fontsize="small")  # below the axes: it hides no point or label
    ranks = [r.ranks for r in ordered]
    labels = [f"rank {r.ranks}" if ranks.count(r.ranks) == 1 else r.lora.stem for r in ordered]
    _place_labels(figure, axis, labels, list(zip(sizes, effect, strict=True)), [*zip(sizes, energy, strict=True)])
    return figure


LABEL_OFFSETS = tuple((dx, dy) for dy in (-14, 6, -26, 18, -38, 30, -50, 42) for dx in (5, -5))
"""Where a point's label may go, in points from the point (right of it for dx > 0, left for dx < 0), in order."""
MARKER_CLEARANCE = 5
"""Pixels around plotted points and lines that labels keep clear of."""


def _place_labels(
    figure: Figure, axis: Axes, labels: Sequence[str], points: Sequence[tuple[float, float]], others: Sequence
) -> None:
    """Label each of ``points`` at the first of ``LABEL_OFFSETS`` that keeps the text inside the axes and clear of
    the labels placed before it and of both plotted lines (``points`` and ``others``); if none does, inside the axes
    over the fewest of them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw_without_rendering()  # settle the layout: the axes' final place on the page
    frame = axis.get_window_extent(renderer)
    taken = [_around(pixel) for series in (points, others) for pixel in _polyline(axis, series)]
    for text, point in zip(labels, points, strict=True):
        note = axis.annotate(text, point, textcoords="offset points", xytext=LABEL_OFFSETS[0], fontsize="small")
        note.set_in_layout(False)  # placed inside the axes: the layout need not make room for it
        best: tuple[tuple[bool, int], tuple[float, float]] | None = None
        for offset in LABEL_OFFSETS:
            box = _move(note, offset, renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            cost = (not inside, sum(box.overlaps(other) for other in taken))
            if best is None or cost < best[0]:
                best = (cost, offset)
            if cost == (False, 0):
                break
        box = _move(note, best[1], renderer)
        taken.append(box)


def _move(note: Annotation, offset: tuple[float, float], renderer: object) -> Bbox:
    """Put ``note`` at ``offset`` points from its point (right of it for dx > 0, else left); its pixel box."""
    note.xyann = offset
    note.set_horizontalalignment("left" if offset[0] > 0 else "right")
    return note.get_window_extent(renderer)


def _polyline(axis: Axes, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pixel positions along the line through ``points`` (data coordinates), at most MARKER_CLEARANCE apart."""
    pixels = axis.transData.transform(points)
    path = [tuple(pixels[0])]
    for (x0, y0), (x1, y1) in zip(pixels[:-1], pixels[1:], strict=True):
        n = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / MARKER_CLEARANCE))
        path += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1)]
    return path


def _around(pixel: tuple[float, float]) -> Bbox:
    """The square of side 2 * MARKER_CLEARANCE around ``pixel``."""
    x, y = pixel
    return Bbox.from_extents(x - MARKER_CLEARANCE, y - MARKER_CLEARANCE, x + MARKER_CLEARANCE, y + MARKER_CLEARANCE)


def _save(figure: Figure, out_png: str | os.PathLike, force: bool) -> Path:
    with atomic_path(out_png, force) as tmp:
        figure.savefig(tmp, format="png", dpi=PLOT_DPI)
    return Path(out_png)
