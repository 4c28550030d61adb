"""``xlbake batch``: run many concepts' finetune -> extract -> resize chains, then one summary table.

Each concept runs as ``make finetune extract resize CONCEPT=<file> RUN=<runs>/<name>`` in the project folder, so
the Makefile's rules decide what is up to date (a finished concept costs seconds; a changed one reruns only what
its change touches). A concept that fails (invalid YAML, bad data, a crash) is recorded and the others go on. At
the end the summary (concept, status, steps, time, output files and sizes, kept energy at each rank) is printed
and written to ``<runs>/summary.md`` and ``<runs>/summary.json``; each concept's make output is in
``<runs>/<name>/batch.log``. The exit code is 1 when any concept failed.

Several GPUs: ``--gpus 0,1,2,3`` runs four concepts at once, one per GPU, each with ``CUDA_VISIBLE_DEVICES`` set to
its GPU (a free GPU takes the next concept). ``--gpus 0+1,2+3`` gives each concept two GPUs; train it on both with
accelerate: ``--make-arg "FINETUNE=.venv/bin/accelerate launch --num_processes 2 -m finetune"``. Without GPUs,
``--jobs N`` runs N concepts at once on the CPU.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal

import click

from xlbake.batch.concepts import Concept, concept_path, list_concepts, load_concept
from xlbake.cli import EXIT_INTERRUPTED, run_guarded
from xlbake.errors import ConfigError, XlbakeError
from xlbake.fileio import write_text_atomic

CHAIN = ("finetune", "extract", "resize")
LOG_NAME = "batch.log"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
TUNED = "tuned.fp32.safetensors"  # the finetune's output that make tracks (and whose metadata has the step count)
BYTES_PER_MB = 1_000_000
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
# make's last word on a failed recipe: "make: *** [Makefile:151: runs/kafka/lora-dim32.safetensors] Error 1"
FAILED_TARGET = re.compile(r"\*\*\* \[[^\]]*?:\d+: (?P<target>[^\]]+)\] Error")
INTERRUPTED_CODES = (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM)
Status = Literal["ok", "failed", "invalid", "interrupted", "skipped"]


@dataclass(frozen=True)
class OutputFile:
    """One model file of a run, with the share of the finetune's difference it keeps (from its report JSON)."""

    name: str
    bytes: int
    kept_energy: float | None  # sum of kept sigma^2 / sum of sigma^2 of tuned - base; None for models/no report


@dataclass(frozen=True)
class ConceptResult:
    """What one concept's chain did."""

    concept: str
    status: Status
    stage: str | None  # the stage that failed ("config", "finetune", "extract", "resize"), None when ok
    message: str  # the error line ("" when ok)
    steps: int | None  # optimizer steps of the finetune (from its output's metadata)
    seconds: float
    run_dir: str
    gpu: str | None
    triggers: tuple[str, ...]
    outputs: tuple[OutputFile, ...]


@dataclass(frozen=True)
class BatchSettings:
    """Where things are and how each concept's make runs."""

    project: Path  # folder with the Makefile
    runs_dir: Path
    make_args: tuple[str, ...] = ()  # extra make arguments, e.g. ("DIM=64",)
    stream: bool = True  # copy make's output to the terminal (one concept at a time only)


def run_batch(
    concepts: Sequence[Path], settings: BatchSettings, *, jobs: int = 1, gpus: Sequence[str] = ()
) -> list[ConceptResult]:
    """Run every concept's chain, ``jobs`` at a time (each on a slot of ``gpus`` if given); results in order.

    After Ctrl-C (make and the stage get it too: a finetune saves its state) the concepts not started yet are
    recorded as skipped, so the summary is still written; ``make all`` later resumes where it stopped.
    """
    slots: queue.Queue[str | None] = queue.Queue()
    for slot in gpus or [None] * jobs:
        slots.put(slot)
    stop = threading.Event()

    def one(path: Path) -> ConceptResult:
        if stop.is_set():
            return _unrun(path, settings, "skipped", "not started: the batch was interrupted", None)
        slot = slots.get()
        try:
            result = run_concept(path, settings, gpu=slot)
        except Exception as exc:  # an unexpected fault in one concept must not end the night's other runs
            click.echo(f"[{path.stem}] failed: {type(exc).__name__}: {exc}", err=True)
            result = _unrun(path, settings, "failed", f"{type(exc).__name__}: {exc}", slot)
        finally:
            slots.put(slot)
        if result.status == "interrupted":
            stop.set()
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, path) for path in concepts]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            stop.set()
            return [future.result() for future in futures]


def _unrun(path: Path, settings: BatchSettings, status: Status, message: str, gpu: str | None) -> ConceptResult:
    run_dir, stage = str(settings.runs_dir / path.stem), "batch" if status == "failed" else None
    return ConceptResult(path.stem, status, stage, message, None, 0.0, run_dir, gpu, (), ())


def run_concept(path: Path, settings: BatchSettings, *, gpu: str | None = None) -> ConceptResult:
    """Load one concept and run ``make finetune extract resize`` for it; never raises for the concept's faults."""
    start, name = time.monotonic(), path.stem
    run_dir = settings.runs_dir / name
    try:
        concept = load_concept(path)
    except XlbakeError as exc:
        result = ConceptResult(name, "invalid", "config", str(exc), None, 0.0, str(run_dir), gpu, (), ())
        click.echo(f"[{name}] invalid concept: {exc}", err=True)
        return result
    click.echo(f"[{name}] {' -> '.join(CHAIN)} into {run_dir}" + (f" on GPU {gpu}" if gpu is not None else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / LOG_NAME
    code = run_make(concept, settings, run_dir, log, gpu)
    stage, message = (None, "") if code == 0 else diagnose(log.read_text(encoding="utf-8", errors="replace"))
    status: Status = "ok" if code == 0 else ("interrupted" if code in INTERRUPTED_CODES else "failed")
    outputs, steps = collect_outputs(run_dir)
    result = ConceptResult(
        concept=name,
        status=status,
        stage=stage,
        message=message or ("" if code == 0 else f"make exited with {code}"),
        steps=steps,
        seconds=time.monotonic() - start,
        run_dir=str(run_dir),
        gpu=gpu,
        triggers=concept.config.triggers,
        outputs=outputs,
    )
    failure = f" ({stage}): {result.message}" if stage else ""
    click.echo(f"[{name}] {result.status}{failure} in {_duration(result.seconds)}; log: {log}")
    return result


def run_make(concept: Concept, settings: BatchSettings, run_dir: Path, log: Path, gpu: str | None) -> int:
    """``make finetune extract resize`` for one concept, output to ``log`` (and the terminal when streaming)."""
    make = shutil.which("make")
    if make is None:
        raise ConfigError("make: not found on PATH; install GNU make (xlbake batch runs each chain through it)")
    command = [
        make, "-C", str(settings.project), "--no-print-directory", *CHAIN,
        f"CONCEPT={concept.path.absolute()}", f"RUNS={settings.runs_dir}", f"RUN={run_dir}", *settings.make_args,
    ]  # fmt: skip
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(log, "wb") as out:
        out.write(("$ " + " ".join(command) + "\n").encode())
        out.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert process.stdout is not None
        _copy(process.stdout, out, sys.stdout.buffer if settings.stream else None)
        return process.wait()


def _copy(source: IO[bytes], log: IO[bytes], terminal: IO[bytes] | None) -> None:
    """Copy a child's output to the log (and the terminal) as it comes; progress bars' \\r pass through."""
    while chunk := source.read1(1 << 14):  # type: ignore[attr-defined]
        log.write(chunk)
        log.flush()
        if terminal is not None:
            terminal.write(chunk)
            terminal.flush()


def diagnose(log_text: str) -> tuple[str, str]:
    """(failed stage, error line) from a concept's make output."""
    lines = [line.strip() for line in log_text.replace("\r", "\n").splitlines() if line.strip()]
    target = next((m["target"] for line in reversed(lines) if (m := FAILED_TARGET.search(line))), None)
    stage = "config" if target is None else _stage_of(Path(target).name)
    errors = [line for line in lines if line.startswith("Error:") or "Error: " in line.split("***")[0]]
    stops = [line.split("***", 1)[1].strip() for line in lines if "***" in line and FAILED_TARGET.search(line) is None]
    message = errors[-1] if errors else (stops[-1] if stops else "")
    return stage, message.removeprefix("Error:").strip()


def _stage_of(target: str) -> str:
    if target.startswith("tuned") or target.startswith(".finetune"):
        return "finetune"
    if re.fullmatch(r"lora-dim\d+\.safetensors", target):
        return "extract"
    return "resize" if target.startswith("lora-") else "config"


def collect_outputs(run_dir: Path) -> tuple[tuple[OutputFile, ...], int | None]:
    """The run's model files with their sizes and kept energy, and the finetune's step count."""
    tuned = sorted(run_dir.glob("tuned*.safetensors"), key=lambda p: (p.name != TUNED, p.name))
    loras = sorted(run_dir.glob("lora-*.safetensors"), key=lambda p: _natural_key(p.stem))
    reports = {p.name: _read_json(p.with_name(p.stem + ".report.json")) for p in loras}
    outputs = [OutputFile(p.name, p.stat().st_size, None) for p in tuned]
    outputs += [OutputFile(p.name, p.stat().st_size, _kept(reports[p.name], reports)) for p in loras]
    return tuple(outputs), (_global_step(tuned[0]) if tuned else None)


def _kept(report: dict | None, reports: dict[str, dict | None]) -> float | None:
    """Kept share of the finetune difference: extract's total, or resize's (of its input LoRA) times its input's."""
    if not report:
        return None
    kept = report.get("total", {}).get("kept_energy")
    source = report.get("summary", {}).get("source")
    if kept is None or source is None:
        return kept
    upstream = _kept(reports.get(source), {})
    return None if upstream is None else kept * upstream


def _global_step(path: Path) -> int | None:
    """``xlbake.global_step`` from a safetensors header (8-byte length, then JSON), without reading tensors."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                return None  # not a safetensors file
            header = json.loads(handle.read(length))
        return int(header["__metadata__"]["xlbake.global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def render_markdown(results: Sequence[ConceptResult]) -> str:
    """The summary as a markdown table (readable in a terminal too), failures listed below it."""
    lines = [
        "| concept | status | steps | time | outputs (size) | kept energy |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in results:
        status = r.status if r.stage is None else f"{r.status} ({r.stage})"
        files = ", ".join(f"{Path(o.name).stem} ({o.bytes / BYTES_PER_MB:.2f} MB)" for o in r.outputs) or "-"
        kept = ", ".join(
            f"{Path(o.name).stem.removeprefix('lora-')} {o.kept_energy * 100:.1f} %"
            for o in r.outputs
            if o.kept_energy is not None
        )
        steps = "-" if r.steps is None else str(r.steps)
        lines.append(f"| {r.concept} | {status} | {steps} | {_duration(r.seconds)} | {files} | {kept or '-'} |")
    failures = [r for r in results if r.status != "ok"]
    if failures:
        lines += ["", "Failures:"]
        for r in failures:
            where = f" ({r.stage})" if r.stage else ""
            lines.append(f"- {r.concept}{where}: {r.message} (log: {Path(r.run_dir) / LOG_NAME})")
    return "\n".join(lines) + "\n"


def write_summary(results: Sequence[ConceptResult], runs_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.json`` in ``runs_dir`` atomically (replacing the previous batch's)."""
    md = write_text_atomic(runs_dir / SUMMARY_MD, render_markdown(results), force=True)
    document = {"concepts": [asdict(r) for r in results]}
    js = write_text_atomic(runs_dir / SUMMARY_JSON, json.dumps(document, indent=1) + "\n", force=True)
    return md, js


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1"`` -> ["0", "1"] (one GPU per concept); ``"0+1,2+3"`` -> ["0,1", "2,3"] (two per concept)."""
    if not text:
        return []
    slots = [slot.strip().replace("+", ",") for slot in text.split(",")]
    if any(not re.fullmatch(r"\d+(,\d+)*", slot) for slot in slots):
        raise ConfigError(f"--gpus: {text!r} is not a GPU list like 0,1 (one per concept) or 0+1,2+3 (two each)")
    return slots


def select_concepts(specs: Sequence[str], all_concepts: bool, concepts_dir: Path) -> list[Path]:
    """Concept files from names/paths, or every concept in ``concepts_dir``; ConfigError for none or a missing one."""
    if all_concepts and specs:
        raise ConfigError("give concept names or --all, not both")
    paths = list_concepts(concepts_dir) if all_concepts else [concept_path(s, concepts_dir) for s in specs]
    if not paths:
        raise ConfigError(f"no concepts: name some, or put concept YAMLs in {concepts_dir} and pass --all")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no such concept file; see {concepts_dir}/ for the concepts")
    names = [p.stem for p in paths]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"concepts named {', '.join(twice)} more than once; each name is one run folder in runs/")
    return [p.absolute() for p in paths]


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
@run_guarded
def main(
    concepts: tuple[str, ...], all_concepts: bool, jobs: int | None, gpus: str | None, project: Path,
    concepts_dir: Path | None, runs_dir: Path | None, make_args: tuple[str, ...],
) -> None:  # fmt: skip
    """Run the finetune -> extract -> resize chain of each CONCEPT (names in concepts/ or YAML paths)."""
    project = project.absolute()
    if not (project / "Makefile").is_file():
        raise ConfigError(f"{project}: no Makefile; run xlbake batch in the project folder or pass -C PROJECT")
    concepts_dir = (concepts_dir or project / "concepts").absolute()
    runs_dir = (runs_dir or project / "runs").absolute()
    paths = select_concepts(concepts, all_concepts, concepts_dir)
    slots = parse_gpus(gpus)
    jobs = jobs or max(1, len(slots))
    if slots and jobs > len(slots):
        raise ConfigError(f"--jobs {jobs} exceeds the {len(slots)} GPU slots of --gpus {gpus}")
    settings = BatchSettings(project, runs_dir, make_args, stream=jobs == 1)
    results = run_batch(paths, settings, jobs=jobs, gpus=slots[:jobs])
    md, js = write_summary(results, runs_dir)
    click.echo("\n" + render_markdown(results) + f"\nSummary: {md} and {js}")
    if any(r.status == "interrupted" for r in results):
        click.echo("Interrupted; run the same command again to continue (finished stages are kept).", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    if any(r.status != "ok" for r in results):
        raise click.exceptions.Exit(1)


if __name__ == "__main__":
    main(prog_name="python -m xlbake.batch.runner")
