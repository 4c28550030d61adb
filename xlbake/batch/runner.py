"""``xlbake batch``: run many concepts' finetune -> extract -> resize chains, then one summary table.

Each concept runs as ``make finetune extract resize CONCEPT=<file> RUN=<runs>/<name>`` in the project folder, so
the Makefile's rules decide what is up to date (a finished concept costs seconds; a changed one reruns only what
its change touches). A concept that fails (invalid YAML, bad data, a crash) is recorded and the others go on. As
each concept ends, its row in ``<runs>/summary.md`` and ``<runs>/summary.json`` is replaced (the summary of every
concept ever run there, see :mod:`xlbake.batch.summary`); at the end this batch's rows are printed. Each concept's
make output is in ``<runs>/<name>/batch.log``. The exit code is 1 when any concept failed.

Ctrl-C (SIGINT to the terminal's whole process group) or SIGTERM (forwarded to each running make, which passes it
on, as make does itself) stops the batch: the running finetunes save their state, no further concept starts, the
summary says at which step each stopped, and the same command resumes them. A second signal aborts the saves.

Several GPUs: ``--gpus 0,1,2,3`` runs four concepts at once, one per GPU, each with ``CUDA_VISIBLE_DEVICES`` set to
its GPU (a free GPU takes the next concept). ``--gpus 0+1,2+3`` gives each concept two GPUs; train it on both with
accelerate: ``--make-arg "FINETUNE=.venv/bin/accelerate launch --num_processes 2 -m finetune"``. Without GPUs,
``--jobs N`` runs N concepts at once on the CPU.

On a cluster, ``--slurm`` submits one SLURM job per concept instead, running the same make chain (see
:mod:`xlbake.batch.slurm`); ``--slurm --status`` puts the jobs' results into the same summary.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import click

from xlbake.batch.concepts import Concept, concept_path, list_concepts, load_concept
from xlbake.batch.run_folder import STEP_PREFIX, TUNED_PREFIX
from xlbake.batch.summary import (
    LOG_NAME,
    ConceptResult,
    Status,
    collect_outputs,
    duration,
    newest_state,
    update_summary,
)
from xlbake.errors import ConfigError, XlbakeError

CHAIN = ("finetune", "extract", "resize")
# make's last word on a failed recipe: "make: *** [Makefile:151: runs/kafka/lora-dim32.safetensors] Error 1", or
# "Interrupt" / "Terminated" when the recipe's command was killed by that signal
FAILED_TARGET = re.compile(
    r"\*\*\* \[[^\]]*?:\d+: (?P<target>[^\]]+)\] (?P<end>Error (?P<code>\d+)|Interrupt|Terminated|Killed)"
)
INTERRUPTED_CODES = (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM)
INTERRUPTED_EXITS = ("130", "143")  # a stage's exit code after SIGINT/SIGTERM (xlbake's stages exit 130)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class BatchSettings:
    """Where things are and how each concept's make runs."""

    project: Path  # folder with the Makefile
    runs_dir: Path
    make_args: tuple[str, ...] = ()  # extra make arguments, e.g. ("DIM=64",)
    stream: bool = True  # copy make's output to the terminal (one concept at a time only)


class Stop:
    """The batch's stop request, set by SIGINT/SIGTERM or by an interrupted concept; knows the running makes."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # the handler may run again while it holds it

    def __bool__(self) -> bool:
        return self.event.is_set()

    def handle(self, signum: int, _frame: object) -> None:
        """Signal handler: no new concept starts; SIGTERM is passed on to each running make."""
        if not self.event.is_set():
            click.echo(
                f"[batch] {signal.Signals(signum).name}: stopping; running finetunes save their state and no other "
                "concept starts (again to abort the saves)",
                err=True,
            )
        self.event.set()
        if signum != signal.SIGINT:  # Ctrl-C reaches the whole foreground process group; SIGTERM only us
            with self.lock:
                for process in self.running:
                    process.send_signal(signum)

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[Stop]:
        """Handle SIGINT/SIGTERM with ``handle`` while the batch runs (main thread only; an ignored one stays so)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            if previous[sig] != signal.SIG_IGN:
                signal.signal(sig, self.handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_batch(
    concepts: Sequence[Path], settings: BatchSettings, *, jobs: int = 1, gpus: Sequence[str] = ()
) -> list[ConceptResult]:
    """Run every concept's chain, ``jobs`` at a time (each on a slot of ``gpus`` if given); results in order.
    Each result goes into the runs folder's summary as soon as its concept ends.

    After Ctrl-C/SIGTERM, or when a concept's chain was interrupted, the concepts not started yet are recorded as
    skipped; running the batch again resumes where it stopped.
    """
    slots: queue.Queue[str | None] = queue.Queue()
    for slot in gpus or [None] * jobs:
        slots.put(slot)
    stop = Stop()

    def one(path: Path) -> ConceptResult:
        slot = slots.get()
        try:
            if stop:
                result = _unrun(path, settings, "skipped", "not started: the batch was interrupted", None)
            else:
                result = run_concept(path, settings, gpu=slot, stop=stop)
        except Exception as exc:  # an unexpected fault in one concept must not end the night's other runs
            click.echo(f"[{path.stem}] failed: {type(exc).__name__}: {exc}", err=True)
            result = _unrun(path, settings, "failed", f"{type(exc).__name__}: {exc}", slot)
        finally:
            slots.put(slot)
        if result.status == "interrupted":
            stop.event.set()
        update_summary(result, settings.runs_dir)
        return result

    with stop.on_signals(), ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, path) for path in concepts]
        pending = set(futures)
        while pending:  # wake up now and then: Python runs signal handlers in this thread only, between waits
            pending = wait(pending, timeout=SIGNAL_POLL_SECONDS).not_done
        return [future.result() for future in futures]


def _unrun(path: Path, settings: BatchSettings, status: Status, message: str, gpu: str | None) -> ConceptResult:
    run_dir, stage = str(settings.runs_dir / path.stem), "batch" if status == "failed" else None
    return ConceptResult(path.stem, status, stage, message, None, 0.0, run_dir, gpu, (), ())


def run_concept(
    path: Path, settings: BatchSettings, *, gpu: str | None = None, stop: Stop | None = None
) -> ConceptResult:
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
    code = run_make(concept, settings, run_dir, log, gpu, Stop() if stop is None else stop)
    result = chain_result(concept, run_dir, code, time.monotonic() - start, gpu=gpu, stopped=bool(stop))
    failure = f" ({result.stage}): {result.message}" if result.stage else ""
    click.echo(f"[{name}] {result.status}{failure} in {duration(result.seconds)}; log: {log}")
    return result


def chain_result(
    concept: Concept, run_dir: Path, code: int, seconds: float, *, gpu: str | None = None, stopped: bool = False
) -> ConceptResult:
    """The summary row of a concept's ended make chain (exit ``code``), from its log and run folder.
    Shared by the local pool and ``--slurm --status``."""
    log_text = "" if code == 0 else (run_dir / LOG_NAME).read_text(encoding="utf-8", errors="replace")
    stage, message = (None, "") if code == 0 else diagnose(log_text)
    interrupted = code != 0 and (code in INTERRUPTED_CODES or stopped or was_interrupted(log_text))
    status: Status = "ok" if code == 0 else ("interrupted" if interrupted else "failed")
    if interrupted:
        message = interruption_note(run_dir, stage)
    run = collect_outputs(run_dir)
    return ConceptResult(
        concept=concept.name,
        status=status,
        stage=stage,
        message=message or ("" if code == 0 else f"make exited with {code}"),
        steps=run.steps,
        seconds=seconds,
        run_dir=str(run_dir),
        gpu=gpu,
        triggers=concept.config.triggers,
        outputs=run.outputs,
        train_seconds=run.train_seconds,
    )


def was_interrupted(log_text: str) -> bool:
    """Whether make's output says a stage ended by SIGINT/SIGTERM (killed by it, or exited 130/143 after it)."""
    ends = [m for line in log_text.replace("\r", "\n").splitlines() if (m := FAILED_TARGET.search(line))]
    return bool(ends) and (ends[-1]["end"] in ("Interrupt", "Terminated") or ends[-1]["code"] in INTERRUPTED_EXITS)


def interruption_note(run_dir: Path, stage: str | None) -> str:
    """Where an interrupted chain stopped and what running the batch again does."""
    if stage not in (None, "finetune", "config"):
        return f"interrupted in {stage}: run the same command again to finish"
    state = newest_state(run_dir)
    if state is None:
        return "interrupted before the finetune saved a state: run the same command again to start it over"
    step = int(state.name.removeprefix(STEP_PREFIX))
    return f"interrupted at step {step}, resumable: run the same command again"


def make_command(make: str, concept: Concept, settings: BatchSettings, run_dir: Path) -> list[str]:
    """The concept's ``make finetune extract resize`` command line (the local pool's and each SLURM job's)."""
    return [
        make, "-C", str(settings.project), "--no-print-directory", *CHAIN,
        f"CONCEPT={concept.path.absolute()}", f"RUNS={settings.runs_dir}", f"RUN={run_dir}", *settings.make_args,
    ]  # fmt: skip


def run_make(concept: Concept, settings: BatchSettings, run_dir: Path, log: Path, gpu: str | None, stop: Stop) -> int:
    """``make finetune extract resize`` for one concept, output to ``log`` (and the terminal when streaming)."""
    make = shutil.which("make")
    if make is None:
        raise ConfigError("make: not found on PATH; install GNU make (xlbake batch runs each chain through it)")
    command = make_command(make, concept, settings, run_dir)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(log, "wb") as out:
        out.write(("$ " + " ".join(command) + "\n").encode())
        out.flush()
        with stop.lock:
            if stop:  # a signal arrived while this concept was being set up
                return -signal.SIGINT
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            stop.running.add(process)
        try:
            assert process.stdout is not None
            _copy(process.stdout, out, sys.stdout.buffer if settings.stream else None)
            return process.wait()
        finally:
            with stop.lock:
                stop.running.discard(process)


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
    if target.startswith((TUNED_PREFIX, ".finetune")):
        return "finetune"
    if re.fullmatch(r"lora-dim\d+\.safetensors", target):
        return "extract"
    return "resize" if target.startswith("lora-") else "config"


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
