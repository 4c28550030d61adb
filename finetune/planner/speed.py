"""Time estimates of the planner: ASSUMED training throughput per kind of GPU, stated as such wherever it is used
(not measured on this machine: a CPU or another GPU says nothing about an A100's speed on the real SDXL)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import FinetuneConfig

GIB = 2**30
A100_SDXL_IMAGES_PER_SECOND = 2.0
"""ASSUMPTION for time estimates and the data benchmark: an A100 trains SDXL (UNet + both text encoders, fp16
autocast, SDPA, no checkpointing) at ~2 images of 1024^2 per second at batch 1 (~0.5 s per micro-step), from
~1.2 s/it reported on an RTX 4090 in bf16 (OneTrainer issue #164) scaled by the A100's ~2x tensor throughput."""
SDXL_IMAGES_PER_SECOND = {"A100": A100_SDXL_IMAGES_PER_SECOND, "A6000": A100_SDXL_IMAGES_PER_SECOND / 2}
"""ASSUMED training throughput per GPU (images of 1024^2 per second, the settings above), not measured here: the
A100's figure above; the RTX A6000 at half of it, the ratio of their dense fp16 tensor throughput (~155 vs ~312
TFLOPS) and close to that of their memory bandwidth (768 GB/s vs 1.6-2 TB/s)."""
GPU_KINDS_BY_MEMORY = {40: "A100", 80: "A100", 48: "A6000"}
"""GiB of a GPU known only by its size (--gpu-memory) -> the kind its time estimate assumes."""
CHECKPOINTING_SLOWDOWN = 1.3
"""ASSUMPTION: gradient checkpointing recomputes the forward in the backward pass, ~+30 % step time."""


@dataclass(frozen=True)
class StepTime:
    """The assumed time of one optimizer step at 1024^2 on a kind of GPU (None: no figure for it)."""

    gpu: str | None
    seconds: float | None


def gpu_kind(name: str | None, memory_bytes: int) -> str | None:
    """The ``SDXL_IMAGES_PER_SECOND`` entry for a GPU: by its CUDA name if known, else by its size; None if none."""
    if name is not None:
        return next((kind for kind in SDXL_IMAGES_PER_SECOND if kind.lower() in name.lower()), None)
    return GPU_KINDS_BY_MEMORY.get(round(memory_bytes / GIB))


def step_seconds(cfg: FinetuneConfig, kind: str | None, area: float) -> float | None:
    """Assumed seconds per optimizer step on one GPU of ``kind``: batch_size x grad_accum images of ``area`` times
    1024^2 pixels at its ``SDXL_IMAGES_PER_SECOND`` (+30 % with gradient checkpointing); None for unknown GPUs."""
    if kind is None:
        return None
    slowdown = CHECKPOINTING_SLOWDOWN if cfg.model.gradient_checkpointing else 1.0
    return cfg.train.batch_size * cfg.train.grad_accum * area * slowdown / SDXL_IMAGES_PER_SECOND[kind]
