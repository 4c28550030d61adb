"""The batch summary: one row per concept in ``RUNS/summary.json`` and ``RUNS/summary.md``.

Every ``xlbake batch`` (several may run at once, e.g. one per GPU) replaces the rows of the concepts it ran, one
concept at a time, under a file lock, and keeps the others. A row lists the concept's trigger words, its status,
the finetune's steps and training time (recorded by the finetune), the run's model files with their sizes, and the
share of the finetune's difference each LoRA keeps. LoRAs made from an earlier finetune than the one now in the run
folder (or resized from an earlier input LoRA) are marked stale: each LoRA's header records what it was made from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from xlbake.batch.run_folder import (
    SAFETENSORS,
    SECONDS_KEY,
    STATE,
    STATE_FILE,
    STEP_KEY,
    STEP_PREFIX,
    TUNED_FP32,
    TUNED_PREFIX,
)
from xlbake.fileio import write_text_atomic
from xlbake.fingerprint import fingerprint
from xlbake.lora.io import HASH_KEY

LOG_NAME = "batch.log"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
SUMMARY_LOCK = ".summary.lock"
SOURCES_KEY = "xlbake_sources"  # extract's header record: each input's file name and fingerprint
RESIZE_KEY = "xlbake_resize"  # resize's header record: its input file name and that file's data hash
BYTES_PER_MB = 1_000_000
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
Status = Literal["ok", "failed", "invalid", "interrupted", "skipped", "queued", "running"]  # last two: SLURM


@dataclass(frozen=True)
class OutputFile:
    """One model file of a run, with the share of the finetune's difference it keeps (from its report JSON)."""

    name: str
    bytes: int
    kept_energy: float | None  # sum of kept sigma^2 / sum of sigma^2 of tuned - base; None for models/no report
    stale: bool = False  # made from an earlier finetune (or input LoRA) than the one now in the run folder


@dataclass(frozen=True)
class ConceptResult:
    """What one concept's chain did."""

    concept: str
    status: Status
    stage: str | None  # the stage that failed ("config", "finetune", "extract", "resize"), None when ok
    message: str  # the error line ("" when ok)
    steps: int | None  # optimizer steps of the finetune (from its output's metadata)
    seconds: float  # what this batch spent on the concept (seconds for an up-to-date one)
    run_dir: str
    gpu: str | None
    triggers: tuple[str, ...]
    outputs: tuple[OutputFile, ...]
    train_seconds: float | None = None  # the finetune's training time, resumes included (recorded by it)


@dataclass(frozen=True)
class RunFiles:
    """What a run folder holds, as the summary shows it."""

    outputs: tuple[OutputFile, ...]
    steps: int | None  # optimizer steps of the finished finetune
    train_seconds: float | None  # its training time, or the newest saved state's for an unfinished one


def collect_outputs(run_dir: Path) -> RunFiles:
    """The run's model files with their sizes, kept energy and staleness, and the finetune's steps and time."""
    tuned = sorted(run_dir.glob(f"{TUNED_PREFIX}*{SAFETENSORS}"), key=lambda p: (p.name != TUNED_FP32, p.name))
    loras = sorted(run_dir.glob("lora-*.safetensors"), key=lambda p: _natural_key(p.stem))
    reports = {p.name: _read_json(p.with_name(p.stem + ".report.json")) for p in loras}
    stale = stale_loras(run_dir, loras)
    outputs = [OutputFile(p.name, p.stat().st_size, None) for p in tuned]
    for p in loras:
        kept = None if p.name in stale else _kept(reports[p.name], reports)
        outputs.append(OutputFile(p.name, p.stat().st_size, kept, p.name in stale))
    meta = read_metadata(tuned[0]) if tuned else {}
    seconds = _float(meta.get(SECONDS_KEY))
    if not tuned and (state := newest_state(run_dir)) is not None:  # unfinished: the time of its saved state
        seconds = _float(_read_json(state / STATE_FILE, {}).get("train_seconds"))
    return RunFiles(tuple(outputs), _int(meta.get(STEP_KEY)), seconds)


def stale_loras(run_dir: Path, loras: Sequence[Path]) -> set[str]:
    """Names of the LoRAs whose recorded source is not what the run folder holds now.

    An extracted LoRA records the fingerprint of the tuned file; a resized one the data hash of its input LoRA,
    which is stale too when that input is. A LoRA without a record, or whose source is gone, is not judged.
    """
    tuned = run_dir / TUNED_FP32
    tuned_print = fingerprint(tuned) if tuned.is_file() else None
    metas = {p.name: read_metadata(p) for p in loras}
    verdicts: dict[str, bool] = {}

    def is_stale(name: str, depth: int = 0) -> bool:
        if name not in verdicts:
            meta = metas.get(name) or {}
            record = _json_dict(meta.get(RESIZE_KEY))
            if record:  # resized: its input, a LoRA beside it
                source = str(record.get("source", ""))
                source_meta = metas.get(source) if source in metas else read_metadata(run_dir / source)
                changed = bool(source_meta) and source_meta.get(HASH_KEY) != record.get("source_sshs_model_hash")
                verdicts[name] = changed or (source in metas and depth < len(metas) and is_stale(source, depth + 1))
            else:
                recorded = _json_dict(_json_dict(meta.get(SOURCES_KEY)).get("tuned")).get("fingerprint")
                verdicts[name] = None not in (recorded, tuned_print) and recorded != tuned_print
        return verdicts[name]

    return {p.name for p in loras if is_stale(p.name)}


def newest_state(run_dir: Path) -> Path | None:
    """The newest complete training state of a run (``state/step-N`` with its trainer_state.json), if any."""
    folder = run_dir / STATE
    named = (p for p in folder.glob(f"{STEP_PREFIX}*") if re.fullmatch(rf"{STEP_PREFIX}\d+", p.name))
    steps = [p for p in named if (p / STATE_FILE).is_file()]
    return max(steps, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)), default=None)


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata, without reading tensors; {} for a missing or unreadable file."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                return {}  # not a safetensors file
            metadata = json.loads(handle.read(length)).get("__metadata__")
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


def _kept(report: dict | None, reports: Mapping[str, dict | None]) -> float | None:
    """Kept share of the finetune difference: extract's total, or resize's (of its input LoRA) times its input's."""
    if not report:
        return None
    kept = report.get("total", {}).get("kept_energy")
    source = report.get("summary", {}).get("source")
    if kept is None or source is None:
        return kept
    upstream = _kept(reports.get(source), {})
    return None if upstream is None else kept * upstream


def _read_json(path: Path, default: dict | None = None) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return data if isinstance(data, dict) else default


def _json_dict(value: object) -> dict:
    """A JSON object from header text (or a parsed value); {} for anything else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def render_markdown(results: Sequence[ConceptResult]) -> str:
    """The summary as a markdown table (readable in a terminal too), problems and stale files listed below it."""
    lines = [
        "| concept | triggers | status | steps | time | outputs (size) | kept energy |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in results:
        status = r.status if r.stage is None else f"{r.status} ({r.stage})"
        files = ", ".join(
            f"{Path(o.name).stem} ({o.bytes / BYTES_PER_MB:.2f} MB{', stale' if o.stale else ''})" for o in r.outputs
        )
        kept = ", ".join(
            f"{Path(o.name).stem.removeprefix('lora-')} {o.kept_energy * 100:.1f} %"
            for o in r.outputs
            if o.kept_energy is not None and not o.stale
        )
        steps = "-" if r.steps is None else str(r.steps)
        time = "-" if r.train_seconds is None else duration(r.train_seconds)
        triggers = ", ".join(r.triggers) or "-"
        lines.append(f"| {r.concept} | {triggers} | {status} | {steps} | {time} | {files or '-'} | {kept or '-'} |")
    notes = [r for r in results if r.status not in ("ok", "queued", "running")]  # the last two: not ended yet
    if notes:
        lines += ["", "Failures:"]
        for r in notes:
            where = f" ({r.stage})" if r.stage else ""
            lines.append(f"- {r.concept}{where}: {r.message} (log: {Path(r.run_dir) / LOG_NAME})")
    stale = [(r, sorted(Path(o.name).stem for o in r.outputs if o.stale)) for r in results]
    if any(names for _, names in stale):
        lines += ["", "Stale LoRAs (remake them with make extract/resize and their DIM/RANK, or delete them):"]
        lines += [f"- {r.concept}: stale (made from an earlier finetune or input): {', '.join(names)}"
                  for r, names in stale if names]  # fmt: skip
    return "\n".join(lines) + "\n"


def update_summary(result: ConceptResult, runs_dir: Path) -> tuple[Path, Path]:
    """Put ``result`` into ``runs_dir``'s summary (its row replaced, every other concept's kept) and rewrite
    ``summary.json`` and ``summary.md`` atomically. A skipped concept does not replace its last real result."""
    with _locked(runs_dir):
        rows = {r.concept: r for r in read_summary(runs_dir)}
        if result.status != "skipped" or result.concept not in rows:
            rows[result.concept] = result
        ordered = [rows[name] for name in sorted(rows)]
        document = {"concepts": [asdict(r) for r in ordered]}
        js = write_text_atomic(runs_dir / SUMMARY_JSON, json.dumps(document, indent=1) + "\n", force=True)
        md = write_text_atomic(runs_dir / SUMMARY_MD, render_markdown(ordered), force=True)
    return md, js


def read_summary(runs_dir: Path) -> list[ConceptResult]:
    """The rows of ``runs_dir/summary.json`` (rows this version cannot read are left out)."""
    rows = _read_json(runs_dir / SUMMARY_JSON, {}).get("concepts")
    results = []
    for row in rows if isinstance(rows, list) else []:
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            known = {f.name for f in fields(ConceptResult)}
            values = {k: v for k, v in row.items() if k in known}
            outputs = tuple(OutputFile(**o) for o in values.get("outputs", ()))
            results.append(ConceptResult(**{**values, "triggers": tuple(values["triggers"]), "outputs": outputs}))
    return results


@contextlib.contextmanager
def _locked(runs_dir: Path) -> Iterator[None]:
    """Hold the summary's lock file: batches that finish concepts at the same moment update it one at a time."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / SUMMARY_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield
