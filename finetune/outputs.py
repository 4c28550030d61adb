"""What a run saves of its model: the weights to save (raw, EMA, frozen parts as loaded), single-file SGM
checkpoints (the final ones and the intermediate ones), a diffusers folder, their metadata, and the loss curve.
Where they go in RUN/: ``xlbake.batch.run_folder``."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.config import CheckpointConfig
from finetune.model import SdxlModel
from finetune.state import TrainerState
from xlbake.batch.run_folder import (
    BASE_KEY,
    BASE_TXT,
    CHECKPOINTS,
    CONFIG_KEY,
    EPOCH_KEY,
    FINAL_TAG,
    FP32_SUFFIX,
    RAW_SUFFIX,
    SAFETENSORS,
    SECONDS_KEY,
    STAGE_KEY,
    STATE,
    STEP_KEY,
    TUNED,
    TUNED_FP32,
    WEIGHTS_KEY,
    output_name,
)
from xlbake.errors import OutputError, TrainingError
from xlbake.fileio import TEMP_PREFIX, write_text_atomic
from xlbake.lora.io import SAVE_DTYPES
from xlbake.sdxl.parts import PART_ATTRS


@dataclass(frozen=True)
class Weights:
    """Diffusers-keyed state dicts of a whole SDXL model, as they will be saved."""

    unet: Mapping[str, torch.Tensor]
    text_encoder: Mapping[str, torch.Tensor]
    text_encoder_2: Mapping[str, torch.Tensor]
    vae: Mapping[str, torch.Tensor]
    kind: str  # "raw" | "ema"
    prediction: str = "epsilon"  # what the UNet predicts: the label of the saved files


def output_kinds(weights: str, ema: bool) -> tuple[str, ...]:
    """The kinds of weights the outputs hold, the one in tuned* first, for ``checkpoint.weights`` and whether EMA
    is on ("auto": the EMA in tuned*, the raw weights beside it, when there is an EMA)."""
    if weights == "auto":
        weights = "both" if ema else "raw"
    return {"raw": ("raw",), "ema": ("ema",), "both": ("ema", "raw")}[weights]


def output_metadata(config_yaml: str, base: Path, state: TrainerState, dataset: Mapping[str, str]) -> dict[str, str]:
    """The metadata of every model file a run saves: its config, base model, progress, and the dataset's kohya keys
    (``dataset``, which every LoRA extracted from it copies)."""
    return {
        STAGE_KEY: "finetune",
        CONFIG_KEY: config_yaml,
        BASE_KEY: str(Path(base).absolute()),
        STEP_KEY: str(state.global_step),
        EPOCH_KEY: str(state.epoch),
        SECONDS_KEY: str(state.train_seconds),
        **dataset,
    }


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
    meta = {**metadata, WEIGHTS_KEY: weights.kind}
    return save_sgm_checkpoint(
        tensors, path, metadata=meta, dtype=SAVE_DTYPES[dtype], force=True, prediction=weights.prediction
    )


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


def save_checkpoint(
    run_dir: Path, tag: str, all_weights: Sequence[Weights], ckpt: CheckpointConfig, base: Path, meta: Mapping[str, str]
) -> list[Path]:
    """The run's final outputs for the tag "final" (``save_final``), else the intermediate checkpoint ``tag``."""
    if tag == FINAL_TAG:
        return save_final(run_dir, all_weights, ckpt.dtype, ckpt.fp32_copy, base, meta)
    return save_intermediate(run_dir, tag, all_weights, ckpt.dtype, ckpt.keep_last, meta, keep_fp32=ckpt.keep_fp32)


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
    names = [tag + SAFETENSORS] + ([tag + FP32_SUFFIX] if keep_fp32 and dtype != "fp32" else [])
    written = []
    for name in names:
        precision = "fp32" if name.endswith(FP32_SUFFIX) else dtype
        written += [save_sgm(w, folder / output_name(name, w.kind, both), precision, metadata) for w in all_weights]
    if keep_last:
        files = sorted(
            (p for p in folder.glob(f"*{SAFETENSORS}") if not p.name.startswith(TEMP_PREFIX)), key=os.path.getmtime
        )
        tags = list(dict.fromkeys(p.name.split(".")[0].removesuffix(RAW_SUFFIX) for p in files))
        for old in tags[:-keep_last]:
            for path in folder.glob(f"{old}*{SAFETENSORS}"):
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
