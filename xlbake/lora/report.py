"""Kept-energy report shared by extract and resize: what a LoRA kept of each layer's difference.

Per layer the kept energy is sum(sigma[:rank]^2) / sum(sigma^2) and the relative Frobenius error of the
truncation is sqrt(1 - kept) (Eckart-Young). Totals weight layers by their energy, so they are the kept fraction
of the difference in the layers the LoRA holds ("kept of covered"). A ``Coverage`` says what share of the whole
finetune (tuned - base over the UNet and text encoders) those layers hold ("covered"), what the LoRA leaves out by
kind of tensor, and so what it keeps of the whole ("kept of finetune" = kept of covered x covered); extract,
resize and ``xlbake fidelity`` use these words. ``write_report`` writes ``<out stem>.report.json`` and
``<out stem>.report.png`` beside the LoRA; ``print_summary`` returns a compact table for the terminal.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xlbake.fileio import atomic_path, check_output, write_text_atomic
from xlbake.sdxl.parts import PARTS

if TYPE_CHECKING:  # imported where plotted: matplotlib costs every run without a report about a second
    from matplotlib.figure import Figure

BYTES_PER_MB = 1_000_000
DEFAULT_BYTES_PER_PARAM = 2.0  # fp16, the default save precision
_DTYPE_BYTES = {"fp16": 2.0, "float16": 2.0, "bf16": 2.0, "bfloat16": 2.0, "fp32": 4.0, "float32": 4.0, "float": 4.0}
_PLOT_DPI = 120
_TITLE_WIDTH = 110  # characters per title line that fit the two-panel figure
_EMBEDDING = "embedding"
_BIAS = "bias"


@dataclass(frozen=True)
class LayerStat:
    """What one layer kept. ``energy`` = sum of all sigma^2 of its difference (its squared Frobenius norm)."""

    name: str
    component: str  # "unet" | "te1" | "te2"
    rank: int
    energy: float
    kept: float  # fraction of ``energy`` kept at ``rank``, in [0, 1]
    params: int  # parameters the layer's factors hold: rank * (out + in * kh * kw)
    spectrum: tuple[float, ...] = ()  # singular values known for the layer, descending (may stop early)

    @property
    def rel_error(self) -> float:
        return math.sqrt(max(0.0, 1.0 - self.kept))


@dataclass(frozen=True)
class GroupStat:
    """Energy-weighted totals over a group of layers (a component, or all of them)."""

    modules: int
    params: int
    energy: float
    kept: float
    min_rank: int
    max_rank: int

    @property
    def rel_error(self) -> float:
        return math.sqrt(max(0.0, 1.0 - self.kept))

    @property
    def ranks(self) -> str:
        return str(self.min_rank) if self.min_rank == self.max_rank else f"{self.min_rank}-{self.max_rank}"


@dataclass(frozen=True)
class Coverage:
    """Where a LoRA's layers sit in the whole finetune, as shares of ||tuned - base||^2 (UNet and text encoders)."""

    covered: float  # share of the finetune's difference in the layers the LoRA holds
    left_out: Mapping[str, float] = field(default_factory=dict)  # kind of tensor (see left_out_kind) -> its share
    input_kept: float = 1.0  # share of the covered difference the input held (a resize's input LoRA; 1 for extract)

    def kept_of_covered(self, layers: Sequence[LayerStat]) -> float:
        """Share of the covered difference these layers keep (through the input, for a resize)."""
        return self.input_kept * group_stat(layers).kept

    def kept_of_finetune(self, layers: Sequence[LayerStat]) -> float:
        return self.covered * self.kept_of_covered(layers)

    def as_dict(self, layers: Sequence[LayerStat]) -> dict[str, object]:
        """The report's ``finetune`` entry; ``kept_of_finetune`` is the share of the whole finetune kept."""
        return {
            "covered": self.covered,
            "left_out": dict(self.left_out),
            "kept_of_covered": self.kept_of_covered(layers),
            "kept_of_finetune": self.kept_of_finetune(layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Coverage:
        """The coverage of a LoRA described by ``as_dict``, as the input of a resize (its kept share carried)."""
        left_out = data.get("left_out") or {}
        if not isinstance(left_out, Mapping):
            raise ValueError("left_out: expected a mapping")
        shares = {str(kind): float(share) for kind, share in left_out.items()}
        return cls(float(data["covered"]), shares, float(data["kept_of_covered"]))

    def lines(self, layers: Sequence[LayerStat]) -> str:
        """Two lines for the terminal: what is covered and left out, and what is kept of the finetune."""
        left = ", ".join(f"{kind} {share * 100:.1f} %" for kind, share in self.left_out.items() if share > 0)
        return (
            f"covered: {self.covered * 100:.1f} % of the finetune (tuned - base); left out: {left or 'nothing'}\n"
            f"kept of finetune: {self.kept_of_finetune(layers) * 100:.1f} % "
            f"(kept of covered {self.kept_of_covered(layers) * 100:.2f} % x covered {self.covered * 100:.1f} %)"
        )


def left_out_kind(key: str, shape: Sequence[int]) -> str:
    """The kind of a model tensor a LoRA does not hold, for the coverage: "3x3 convs", "1x1 convs", "embeddings",
    "biases", "norms", "other linear layers" or "other"."""
    if len(shape) == 4:
        return "1x1 convs" if tuple(shape[2:]) == (1, 1) else "3x3 convs"
    if key.removesuffix(".weight").endswith(_EMBEDDING):  # token/position embeddings, not time_embed or label_emb
        return "embeddings"
    if key.endswith(_BIAS):
        return "biases"
    if len(shape) == 1:
        return "norms"
    return "other linear layers" if len(shape) == 2 else "other"


def group_stat(layers: Sequence[LayerStat]) -> GroupStat:
    """Totals of ``layers``; kept = sum(energy * kept) / sum(energy), 1.0 when nothing changed."""
    energy = sum(layer.energy for layer in layers)
    kept_energy = sum(layer.energy * layer.kept for layer in layers)
    return GroupStat(
        modules=len(layers),
        params=sum(layer.params for layer in layers),
        energy=energy,
        kept=kept_energy / energy if energy > 0 else 1.0,
        min_rank=min((layer.rank for layer in layers), default=0),
        max_rank=max((layer.rank for layer in layers), default=0),
    )


def by_component(layers: Sequence[LayerStat]) -> dict[str, list[LayerStat]]:
    """Layers grouped by component, in the order unet, te1, te2 (then any other name)."""
    groups: dict[str, list[LayerStat]] = {}
    for layer in layers:
        groups.setdefault(layer.component, []).append(layer)
    order = [c for c in PARTS if c in groups] + sorted(set(groups) - set(PARTS))
    return {component: groups[component] for component in order}


def kept_vs_rank(layers: Sequence[LayerStat]) -> np.ndarray:
    """Kept fraction of the group's energy if every layer had rank r, for r = 0..longest spectrum: (R + 1,).

    Uses each layer's known spectrum; a layer is capped at its spectrum's length. Layers without a spectrum
    count in the denominator only.
    """
    total = sum(layer.energy for layer in layers)
    longest = max((len(layer.spectrum) for layer in layers), default=0)
    curve = np.zeros(longest + 1)
    for layer in layers:
        if layer.spectrum:
            cumulative = np.cumsum(np.square(np.asarray(layer.spectrum, dtype=np.float64)))
            curve[1:] += np.pad(cumulative, (0, longest - len(cumulative)), mode="edge")
    return np.clip(curve / total, 0.0, 1.0) if total > 0 else np.ones(longest + 1)


def kept_vs_size(layers: Sequence[LayerStat], bytes_per_param: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Kept fraction against file size (MB) for one rank everywhere and for the best per-layer allocation.

    The best allocation adds singular values in order of energy per byte (greedy is optimal here because each
    layer's sigma^2 only decreases). Returns ``{"same rank": (mb, kept), "best allocation": (mb, kept)}``; empty
    when no layer has a spectrum and a rank.
    """
    usable = [layer for layer in layers if layer.spectrum and layer.rank > 0]
    total = sum(layer.energy for layer in layers)
    if not usable or total <= 0:
        return {}
    mb_per_param = bytes_per_param / BYTES_PER_MB
    costs = np.array([layer.params / layer.rank for layer in usable])  # parameters one more rank costs
    lengths = np.array([len(layer.spectrum) for layer in usable])
    ranks = np.arange(1, lengths.max() + 1)
    same_mb = np.array([(costs * np.minimum(r, lengths)).sum() for r in ranks]) * mb_per_param
    energies = np.concatenate([np.square(np.asarray(layer.spectrum, dtype=np.float64)) for layer in usable])
    unit_costs = np.repeat(costs, lengths)
    order = np.argsort(-energies / unit_costs, kind="stable")
    best_mb = np.cumsum(unit_costs[order]) * mb_per_param
    best_kept = np.clip(np.cumsum(energies[order]) / total, 0.0, 1.0)
    same_kept = kept_vs_rank(usable)[1:] * sum(layer.energy for layer in usable) / total
    return {"same rank": (same_mb, same_kept), "best allocation": (best_mb, best_kept)}


def bytes_per_param(summary: Mapping[str, object]) -> float:
    """Bytes one stored parameter takes: ``summary["bytes_per_param"]``, or from ``save_precision``/``dtype``."""
    if isinstance(summary.get("bytes_per_param"), (int, float)):
        return float(summary["bytes_per_param"])
    for key in ("save_precision", "dtype"):
        name = str(summary.get(key, "")).removeprefix("torch.")
        if name in _DTYPE_BYTES:
            return _DTYPE_BYTES[name]
    return DEFAULT_BYTES_PER_PARAM


def report_paths(out_file: str | os.PathLike) -> tuple[Path, Path]:
    """``<stem>.report.json`` and ``<stem>.report.png`` beside ``out_file``."""
    out_file = Path(out_file)
    return out_file.with_name(f"{out_file.stem}.report.json"), out_file.with_name(f"{out_file.stem}.report.png")


def write_report(
    out_file: str | os.PathLike,
    layers: Sequence[LayerStat],
    summary: Mapping[str, object],
    *,
    title: str,
    force: bool,
    coverage: Coverage | None = None,
) -> tuple[Path, Path]:
    """Write the JSON report and the kept-energy plot beside ``out_file``; return (json path, png path).

    The size axis uses the written LoRA's real bytes per parameter when ``out_file`` exists, else ``summary``'s
    precision (see ``bytes_per_param``). ``summary`` is copied into the JSON as given (paths become strings).
    With a ``coverage`` the JSON's ``finetune`` entry (see ``Coverage.as_dict``) and the plot's title say what the
    LoRA covers and keeps of the whole finetune.
    """
    if not layers:
        raise ValueError("write_report: no layers to report")
    json_path, png_path = (check_output(path, force) for path in report_paths(out_file))
    out_file = Path(out_file)
    total = group_stat(layers)
    file_mb = out_file.stat().st_size / BYTES_PER_MB if out_file.is_file() else None
    per_param = file_mb * BYTES_PER_MB / total.params if file_mb and total.params else bytes_per_param(summary)
    document = _report_document(out_file, layers, summary, title=title, file_mb=file_mb)
    if coverage is not None:
        document["finetune"] = coverage.as_dict(layers)
        wrapped = (textwrap.fill(line, _TITLE_WIDTH) for line in coverage.lines(layers).splitlines())
        title = "\n".join([title, *wrapped])
    write_text_atomic(json_path, json.dumps(_jsonable(document), indent=1) + "\n", force=force)
    figure = _plot(layers, title=title, per_param=per_param, file_mb=file_mb)
    with atomic_path(png_path, force) as tmp:
        figure.savefig(tmp, format="png", dpi=_PLOT_DPI)
    return json_path, png_path


def print_summary(
    layers: Sequence[LayerStat], summary: Mapping[str, object], coverage: Coverage | None = None
) -> str:
    """A compact table: component, modules, rank(s), kept energy (of each component's covered difference),
    relative error, MB (at the save precision); with a ``coverage``, its two lines below."""
    mb_per_param = bytes_per_param(summary) / BYTES_PER_MB
    rows = [(name, group_stat(group)) for name, group in by_component(layers).items()]
    rows.append(("total", group_stat(layers)))
    lines = [f"{'component':<10}{'modules':>8}  {'rank(s)':<9}{'kept energy':>12}{'rel. error':>12}{'MB':>10}"]
    for name, stat in rows:
        lines.append(
            f"{name:<10}{stat.modules:>8}  {stat.ranks:<9}{stat.kept * 100:>11.2f}%"
            f"{stat.rel_error:>12.4f}{stat.params * mb_per_param:>10.2f}"
        )
    if coverage is not None:
        lines.append(coverage.lines(layers))
    return "\n".join(lines)


def _group_dict(stat: GroupStat) -> dict[str, object]:
    return {
        "modules": stat.modules,
        "rank_min": stat.min_rank,
        "rank_max": stat.max_rank,
        "params": stat.params,
        "energy": stat.energy,
        "kept_energy": stat.kept,
        "rel_error": stat.rel_error,
    }


def _report_document(
    out_file: Path, layers: Sequence[LayerStat], summary: Mapping[str, object], *, title: str, file_mb: float | None
) -> dict[str, object]:
    groups = by_component(layers)
    return {
        "title": title,
        "output": str(out_file),
        "file_mb": file_mb,
        "summary": dict(summary),
        "total": _group_dict(group_stat(layers)),
        "components": {name: _group_dict(group_stat(group)) for name, group in groups.items()},
        "kept_vs_rank": {name: kept_vs_rank(group).tolist() for name, group in groups.items()},
        "layers": [
            {
                "name": layer.name,
                "component": layer.component,
                "rank": layer.rank,
                "energy": layer.energy,
                "kept_energy": layer.kept,
                "rel_error": layer.rel_error,
                "params": layer.params,
            }
            for layer in layers
        ],
    }


def _plot(layers: Sequence[LayerStat], *, title: str, per_param: float, file_mb: float | None) -> Figure:
    """Kept energy vs rank per component (chosen ranks marked) and, when spectra allow, vs file size."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    size_curves = kept_vs_size(layers, per_param)
    figure = Figure(figsize=(12 if size_curves else 7, 5), layout="constrained")
    axes = figure.subplots(1, 2 if size_curves else 1, squeeze=False)[0]
    figure.suptitle(title)
    rank_axis = axes[0]
    for index, (name, group) in enumerate(by_component(layers).items()):
        color = f"C{index}"
        curve = kept_vs_rank(group)
        if len(curve) > 1:
            rank_axis.plot(np.arange(1, len(curve)), curve[1:] * 100, color=color, label=f"{name}: rank r everywhere")
        stat = group_stat(group)
        chosen = float(np.median([layer.rank for layer in group]))
        label = f"{name} chosen: rank {stat.ranks}, {stat.kept * 100:.1f} %"
        rank_axis.plot([max(chosen, 1.0)], [stat.kept * 100], "o", color=color, markersize=8, label=label)
    rank_axis.set_xscale("log", base=2)
    rank_axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    rank_axis.set(xlabel="rank per layer (median for mixed ranks)", ylabel="kept energy: Σ kept σ² / Σ σ² (%)")
    rank_axis.set_title("kept energy vs rank, per component")
    if size_curves:
        size_axis = axes[1]
        for label, (mb, kept) in size_curves.items():
            size_axis.plot(mb, kept * 100, label=label)
        total = group_stat(layers)
        chosen_mb = file_mb if file_mb is not None else total.params * per_param / BYTES_PER_MB
        size_axis.plot([chosen_mb], [total.kept * 100], "o", color="black", label=f"this file: {chosen_mb:.2f} MB")
        size_axis.set(xlabel="file size (MB, 10⁶ bytes)", ylabel="kept energy, all components (%)")
        size_axis.set_title("kept energy vs file size")
    for axis in axes:
        axis.set_ylim(0, 101)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small", loc="lower right")
    return figure


def _jsonable(value: object) -> object:
    """Plain JSON values: non-finite floats become null, paths and other objects their text."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return str(value)
