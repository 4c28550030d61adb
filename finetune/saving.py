"""Model outputs of a run: single-file SGM checkpoints, the fp32 copy extraction reads, base.txt, a diffusers
folder, the loss curve, and the SIGINT/SIGTERM guard that lets the trainer save its state before exiting.

Run folder names are the contract with the Makefile and the extract stage (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.model import SdxlModel
from finetune.state import flatten
from xlbake.batch.base_of import BASE_TXT
from xlbake.errors import OutputError, TrainingError
from xlbake.fileio import TEMP_PREFIX, write_text_atomic
from xlbake.lora.io import SAVE_DTYPES
from xlbake.sdxl.parts import PART_ATTRS

logger = logging.getLogger(__name__)

TUNED = "tuned.safetensors"
TUNED_FP32 = "tuned.fp32.safetensors"
RAW_SUFFIX = "-raw"
RESOLVED_CONFIG = "config.resolved.yaml"
CHECKPOINTS = "checkpoints"
STATE = "state"
SAMPLES = "samples"
LOGS = "logs"
LOSS_PNG = "loss.png"
DIFFUSERS_DIR = "tuned-diffusers"
BUILTIN = "builtin"


@dataclass(frozen=True)
class Weights:
    """Diffusers-keyed state dicts of a whole SDXL model, as they will be saved."""

    unet: Mapping[str, torch.Tensor]
    text_encoder: Mapping[str, torch.Tensor]
    text_encoder_2: Mapping[str, torch.Tensor]
    vae: Mapping[str, torch.Tensor]
    kind: str  # "raw" | "ema"
    prediction: str = "epsilon"  # what the UNet predicts: the label of the saved files


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> Path:
    """Refuse, writing nothing, a run folder that cannot be used: a non-empty one needs ``resume`` or ``force``;
    it (or, if missing, the nearest existing folder above it) must be a writable folder."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (resume or force):
        raise OutputError(
            f"{run_dir}: run folder is not empty; pass --resume auto to continue it, --force to start over, "
            "or choose another run_dir"
        )
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{run_dir}: cannot create the run folder ({existing} is a file); choose a writable run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{run_dir}: {existing} is not writable; choose a writable run_dir")
    return run_dir


def check_restart(run_dir: Path) -> None:
    """Refuse, writing nothing, to train from step 0 over the model outputs of a run folder (``--resume auto``
    that found no training state, e.g. after a run with checkpoint.save_state false)."""
    run_dir = Path(run_dir)
    outputs = sorted(run_dir.glob("tuned*")) + sorted((run_dir / CHECKPOINTS).glob("*.safetensors"))
    if outputs:
        raise OutputError(
            f"{run_dir}: no training state to resume in {run_dir / STATE}, and resuming would train from step 0 "
            f"over {outputs[0]}; pass --force to start over, or choose another run_dir"
        )


def final_output(run_dir: Path, fp32_copy: bool) -> Path:
    """The run's main output: tuned.fp32.safetensors (written last, the Makefile's target), else tuned.safetensors."""
    return Path(run_dir) / (TUNED_FP32 if fp32_copy else TUNED)


def prepare_run_dir(cfg: Any, resume: bool, force: bool) -> Path:
    """Start the run folder (after ``check_run_dir``) and write ``config.resolved.yaml``.

    ``force`` without ``resume`` starts over: this run's state, checkpoints, samples and logs are removed.
    """
    from xlbake.config import dump_yaml

    run_dir = check_run_dir(Path(cfg.run_dir), resume, force)
    if force and not resume:
        for name in (STATE, CHECKPOINTS, SAMPLES, LOGS, DIFFUSERS_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    write_text_atomic(run_dir / RESOLVED_CONFIG, dump_yaml(cfg), force=True)
    return run_dir


def output_kinds(weights: str, ema: bool) -> tuple[str, ...]:
    """The kinds of weights the outputs hold, the one in tuned* first, for ``checkpoint.weights`` and whether EMA
    is on ("auto": the EMA in tuned*, the raw weights beside it, when there is an EMA)."""
    if weights == "auto":
        weights = "both" if ema else "raw"
    return {"raw": ("raw",), "ema": ("ema",), "both": ("ema", "raw")}[weights]


def collect_weights(
    model: SdxlModel,
    emas: Mapping[str, Any],
    kinds: Sequence[str],
    raw: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> list[Weights]:
    """State dicts to save, one ``Weights`` per kind ("raw" or "ema"; parts without EMA give their raw weights).

    ``raw``: part name -> the raw state dict to use instead of the module's (weights gathered from DeepSpeed, a
    frozen part's base weights from ``finetune.model.frozen_base_weights``).
    """
    out = []
    for kind in kinds:
        parts = pipeline_parts(model, emas if kind == "ema" else {})
        dicts = {attr: parts[attr].state_dict() for attr in (*PART_ATTRS.values(), "vae")}
        for part, state_dict in (raw or {}).items():
            if kind == "raw" or part not in emas:
                dicts[PART_ATTRS[part]] = state_dict
        out.append(Weights(**dicts, kind=kind, prediction=model.noise_scheduler.config.prediction_type))
    return out


def pipeline_parts(model: SdxlModel, emas: Mapping[str, Any]) -> dict[str, Any]:
    """StableDiffusionXLPipeline keyword arguments from the model, with the EMA copies of the parts in ``emas``."""
    parts: dict[str, Any] = {attr: model.part(part) for part, attr in PART_ATTRS.items()}
    parts |= {PART_ATTRS[part]: ema.ema_model for part, ema in emas.items()}
    return parts | {
        "vae": model.vae,
        "tokenizer": model.tokenizer,
        "tokenizer_2": model.tokenizer_2,
        "scheduler": model.noise_scheduler,
    }


def check_finite(weights: Weights) -> None:
    """TrainingError naming the first non-finite tensor: NaN weights are never written over good ones."""
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for name, tensor in getattr(weights, part).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingError(
                    f"{part}.{name}: weights are not finite, nothing saved; the last good state is in RUN/{STATE}/ "
                    "(lower the LR, or use bf16 instead of fp16)"
                )


def save_sgm(weights: Weights, path: Path, dtype: str, metadata: Mapping[str, str]) -> Path:
    """Write ``weights`` as one SGM-keyed safetensors file at ``dtype`` (atomic; replaces an older file), labelled
    with its prediction type."""
    from xlbake.sdxl.checkpoint import save_sgm_checkpoint, sgm_state_dict

    check_finite(weights)
    tensors = sgm_state_dict(
        unet=weights.unet, text_encoder=weights.text_encoder, text_encoder_2=weights.text_encoder_2, vae=weights.vae
    )
    meta = {**metadata, "xlbake.weights": weights.kind}
    return save_sgm_checkpoint(
        tensors, path, metadata=meta, dtype=SAVE_DTYPES[dtype], force=True, prediction=weights.prediction
    )


def output_name(name: str, kind: str, both: bool) -> str:
    """``tuned.safetensors`` -> ``tuned-raw.safetensors`` for the raw copy when both EMA and raw are saved."""
    if not both or kind == "ema":
        return name
    stem, _, ext = name.partition(".")
    return f"{stem}{RAW_SUFFIX}.{ext}"


def save_final(
    run_dir: Path, all_weights: Sequence[Weights], dtype: str, fp32_copy: bool, base: Path, metadata: Mapping[str, str]
) -> list[Path]:
    """The run's final outputs: base.txt, tuned.safetensors (``dtype``) and, last, tuned.fp32.safetensors.

    The fp32 copy is written last because it is the Makefile's target: its presence means the run finished.
    """
    both = len(all_weights) > 1
    written = [write_text_atomic(run_dir / BASE_TXT, f"{Path(base).absolute()}\n", force=True)]
    for weights in all_weights:
        written.append(save_sgm(weights, run_dir / output_name(TUNED, weights.kind, both), dtype, metadata))
    if fp32_copy:
        for weights in sorted(all_weights, key=lambda w: output_name(TUNED_FP32, w.kind, both) == TUNED_FP32):
            written.append(save_sgm(weights, run_dir / output_name(TUNED_FP32, weights.kind, both), "fp32", metadata))
    return written


def save_intermediate(
    run_dir: Path,
    tag: str,
    all_weights: Sequence[Weights],
    dtype: str,
    keep_last: int,
    metadata: Mapping[str, str],
    keep_fp32: bool = False,
) -> list[Path]:
    """``RUN/checkpoints/{tag}.safetensors`` (and ``{tag}-raw`` with both), with ``keep_fp32`` also
    ``{tag}.fp32.safetensors`` unless ``dtype`` is fp32 already; keep the newest ``keep_last`` tags."""
    folder = run_dir / CHECKPOINTS
    both = len(all_weights) > 1
    names = [f"{tag}.safetensors"] + ([f"{tag}.fp32.safetensors"] if keep_fp32 and dtype != "fp32" else [])
    written = [
        save_sgm(w, folder / output_name(name, w.kind, both), "fp32" if ".fp32." in name else dtype, metadata)
        for name in names
        for w in all_weights
    ]
    if keep_last:
        files = sorted(
            (p for p in folder.glob("*.safetensors") if not p.name.startswith(TEMP_PREFIX)), key=os.path.getmtime
        )
        tags = list(dict.fromkeys(p.name.split(".")[0].removesuffix(RAW_SUFFIX) for p in files))
        for old in tags[:-keep_last]:
            for path in folder.glob(f"{old}*.safetensors"):
                path.unlink(missing_ok=True)
    return written


def save_diffusers_folder(
    pipeline_parts: Mapping[str, object], folder: Path, states: Mapping[str, Mapping[str, torch.Tensor]] = {}
) -> Path:
    """Save a StableDiffusionXLPipeline folder built from ``pipeline_parts``, renamed into place when complete.

    ``states``: pipeline part (e.g. "text_encoder_2") -> the state dict to write instead of the module's weights.
    """
    from diffusers import StableDiffusionXLPipeline

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder.parent))
    try:
        with contextlib.ExitStack() as stack:
            for name, state in states.items():
                stack.enter_context(holding(pipeline_parts[name], state))
            StableDiffusionXLPipeline(**pipeline_parts, add_watermarker=False).save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot write ({exc.strerror}); free disk space or choose another run_dir"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@contextlib.contextmanager
def holding(module: Any, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside: the parameters and buffers of ``module`` named in ``state`` hold its tensors (any dtype or device);
    after: their own again. Saves a module's base weights without a second copy of it on the GPU."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    own = {name: tensors[name].data for name in state}
    try:
        for name, value in state.items():
            tensors[name].data = value
        yield
    finally:
        for name, value in own.items():
            tensors[name].data = value


def write_loss_plot(losses: Sequence[float], lrs: Sequence[float], path: Path) -> Path | None:
    """The run's loss curve (``xlbake loss-plot``'s figure) from its loss and LR per optimizer step; None with no
    finite loss. Step i + 1 is the i-th entry; non-finite losses (skipped steps) are left out."""
    from xlbake.evaluate.plots import LossLog, Series, plot_loss_curve

    finite = {i + 1: v for i, v in enumerate(losses) if math.isfinite(v)}
    if not finite:
        return None
    lr = {"lr": Series(tuple(range(1, len(lrs) + 1)), tuple(lrs))} if lrs else {}
    log = LossLog(Series(tuple(finite), tuple(finite.values())), lr, path.parent)
    return plot_loss_curve(log, path, title=f"training loss: {path.parent.name}", force=True)


class StopRequest:
    """Set by SIGINT/SIGTERM: the trainer finishes the current optimizer step, saves its state and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def request(self, signum: int) -> None:
        """Record a stop request (what the signal handler does)."""
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT/SIGTERM while training: the first asks for a clean stop, a second one ends the process at once.

    After the first signal both go back to the system's default action, so the second kills the process even while
    the state save is inside a long native call (a multi-GB write or fsync, where no Python handler could run);
    the previous complete state stays in place (``finetune.state`` renames a finished state folder into place).
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        logger.warning(
            "%s received: saving the training state after this step (again to abort)", signal.Signals(signum).name
        )
        stop.request(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class DataTimer:
    """Share of wall time spent waiting for the next batch."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.start = time.perf_counter()

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - began
            yield batch

    def share(self) -> float:
        return self.waiting / max(time.perf_counter() - self.start, 1e-9)


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """Flat scalar hyperparameters for the trackers (tensorboard's hparams take no lists or None)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in flatten(config).items()
        if not (isinstance(v, float) and math.isnan(v))
    }
