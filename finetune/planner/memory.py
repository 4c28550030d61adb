"""The memory a finetune config takes per GPU and in host RAM, line by line (the plan around it: ``plan``).

The model parts are built on the meta device (no weights) from the configured architecture: parameters are counted
exactly, per part and trained or not. Weights, gradients, optimizer states and EMA follow from them and from the
code that allocates them (``finetune.model.setup_trainable``, ``finetune.optim``, ema-pytorch, DeepSpeed ZeRO).
Activations are measured by a shape-only forward (``finetune.planner.measure``): an estimate, as labelled.

Figures are bytes. The peak per GPU is what stays allocated (weights, gradients, states, ...) plus the larger of
the forward/backward phase (activations, autocast weight copies) and the optimizer-step phase (its temporaries).
Gradients count in full beside the activations: exact with grad_accum > 1 (they persist between micro-batches),
an upper bound with grad_accum 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from finetune.config import FinetuneConfig
from finetune.launch import ZERO3, ZeroSettings
from finetune.planner.measure import measure_sdxl
from finetune.planner.parts import Part
from finetune.planner.speed import GIB
from xlbake.sdxl.parts import PART_ATTRS

HEADROOM = 0.05
"""A plan "fits" below 95 % of the GPU: allocator fragmentation and cuDNN/cuBLAS workspaces take the rest."""
CUDA_CONTEXT_BYTES = 1 * GIB
"""Assumed per-GPU CUDA context + kernels + library handles outside PyTorch's allocator (0.5-1 GiB typical)."""
PROCESS_HOST_BYTES = 3 * GIB
"""Assumed host RAM of one training process besides the model (Python, torch and CUDA libraries, buffers)."""
WORKER_HOST_BYTES = GIB // 2
"""Assumed host RAM of one DataLoader worker (decoded 1024^2 images, prefetched batches)."""
ZERO_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default reduce_bucket_size / allgather_bucket_size (elements), used by accelerate's configs."""
ZERO3_LIVE_PARAMETERS = 1_000_000_000
"""DeepSpeed's default stage3_max_live_parameters: gathered full-size parameters alive at once under ZeRO-3."""
DDP_GRADIENT_AS_BUCKET_VIEW = False
"""What finetune.trainer gives DDP (accelerate's default): False = DDP keeps its own copy of all gradients."""
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096
"""bitsandbytes 8-bit optimizers: one fp32 absmax per 256 values; tensors under 4096 values keep 32-bit states."""
Verdict = Literal["fits", "tight", "does not fit"]


@dataclass(frozen=True)
class Line:
    """One row of the memory table: bytes on each GPU and in host RAM."""

    label: str
    gpu: int
    host: int = 0
    phase: Literal["resident", "forward", "step", "load"] = "resident"
    note: str = ""


def verdict_for(total: int, capacity: int) -> Verdict:
    """fits: below 95 % of the GPU; tight: below 100 % (may OOM from fragmentation); else does not fit."""
    if total <= capacity * (1 - HEADROOM):
        return "fits"
    return "tight" if total <= capacity else "does not fit"


def totals(lines: Sequence[Line]) -> tuple[int, int]:
    """(peak bytes per GPU, peak host bytes): resident + the larger phase; host = the larger of load and training."""
    resident = sum(line.gpu for line in lines if line.phase == "resident")
    phases = [sum(line.gpu for line in lines if line.phase == p) for p in ("forward", "step")]
    load = sum(line.host for line in lines if line.phase == "load")
    training = sum(line.host for line in lines if line.phase != "load")
    return resident + max(phases), max(load, training)


def memory_lines(cfg: FinetuneConfig, parts: Sequence[Part], gpus: int, deepspeed: ZeroSettings | None) -> list[Line]:
    """Every memory line of the plan (see the module docstring for how they add up)."""
    p = cfg.precision
    train_bytes = 2 if p.full_bf16 else 4
    low_bytes = 2 if p.mixed != "no" else 4
    by_name = {part.name: part for part in parts}
    trained = [by_name[n] for n, lr in cfg.optim.part_lrs.items() if lr > 0]
    frozen = [by_name[n] for n, lr in cfg.optim.part_lrs.items() if lr == 0]
    shapes = [s for part in trained for s in part.trained_shapes]
    weights = sum(part.params for part in trained) * train_bytes + sum(part.buffer_bytes for part in trained)
    vae_bytes = by_name["vae"].params * (2 if p.vae == "fp16" else 4)
    ema = weights + EMA_SCALAR_BYTES * len(trained)
    ema_on_gpu = cfg.ema.device == "same"
    state_bytes = optimizer_state_bytes(cfg.optim.name, shapes, train_bytes, cfg.optim.args)
    vae_scale = 2 ** (len(by_name["vae"].config["block_out_channels"]) - 1)
    activations = measure_sdxl(
        {PART_ATTRS[part.name]: part.config for part in parts if part.name != "vae"},
        trained={part.name: True for part in trained},
        mixed=p.mixed,
        full_bf16=p.full_bf16 or deepspeed is not None,
        attention=cfg.model.attention,
        latent_hw=(cfg.data.resolution // vae_scale,) * 2,
        batch=cfg.train.batch_size,
        windows=cfg.caption.max_token_length // 75,
    )
    ckpt = cfg.model.gradient_checkpointing
    act_label = "activations (estimate, " + ("with" if ckpt else "no") + " gradient checkpointing)"
    act_note = f"measured by a shape-only forward at {cfg.data.resolution}^2 x batch {cfg.train.batch_size}"
    lines = [
        Line("frozen parts + VAE", sum(f.params * low_bytes + f.buffer_bytes for f in frozen) + vae_bytes),
        Line(act_label, activations.kept(ckpt), phase="forward", note=act_note),
        Line("CUDA context (assumed)", CUDA_CONTEXT_BYTES),
    ]
    if cfg.ema.enabled:
        host_ema = ema * gpus  # every process of a launch keeps its own EMA
        lines.append(Line(f"EMA ({'GPU' if ema_on_gpu else 'host RAM'})", *((ema, 0) if ema_on_gpu else (0, host_ema))))
    if deepspeed is None:
        lines += _plain_lines(cfg, trained, shapes, weights, state_bytes, activations.weight_copies, gpus)
    else:
        lines += _zero_lines(cfg, trained, shapes, gpus, deepspeed)
    return lines + _host_lines(cfg, parts, gpus)


EMA_SCALAR_BYTES = 9
"""ema-pytorch's two buffers per EMA: `initted` (bool) and `step` (int64)."""


def _plain_lines(
    cfg: FinetuneConfig, trained: Sequence[Part], shapes: list, weights: int, states: int, copies: int, gpus: int
) -> list[Line]:
    train_bytes = 2 if cfg.precision.full_bf16 else 4
    grads = sum(math.prod(s) for s in shapes) * train_bytes
    kind = "bf16" if cfg.precision.full_bf16 else "fp32 master"
    lines = [
        Line(f"trained weights ({kind})", weights),
        Line("gradients", grads),
        Line(f"optimizer states ({cfg.optim.name})", states),
        Line("autocast weight copies (forward)", copies, phase="forward", note="fp16/bf16 casts of trained weights"),
        Line("optimizer step temporaries", _step_temporaries(cfg, trained, train_bytes), phase="step"),
    ]
    if gpus > 1 and not DDP_GRADIENT_AS_BUCKET_VIEW:
        lines.append(Line("DDP gradient buckets", grads, note="DDP's copy of the gradients for all-reduce"))
    return lines


def _zero_lines(cfg: FinetuneConfig, trained: Sequence[Part], shapes: list, gpus: int, ds: ZeroSettings) -> list[Line]:
    """ZeRO: the engine holds 16-bit weights and gradients, fp32 master weights and fp32 optimizer states,
    partitioned over the GPUs (stage 1: states; 2: + gradients; 3: + weights), optionally offloaded to the CPU.
    Host figures are for all ranks of the node."""
    half = 2 if cfg.precision.mixed != "no" else 4
    n_trained = sum(math.prod(s) for s in shapes)
    n_weights = sum(part.params for part in trained)
    weights, host_weights = n_weights * half + sum(part.buffer_bytes for part in trained), 0
    if ds.stage == ZERO3:
        live = min(n_weights, ZERO3_LIVE_PARAMETERS) * half
        weights, host_weights = (live, weights) if ds.params_on_cpu else (live + weights // gpus, 0)
    master = n_trained * 4 if half == 2 else 0  # in fp32 the engine updates the weights themselves
    offload = ds.optimizer_on_cpu
    kind = "adamw" if offload else cfg.optim.name  # accelerate swaps in DeepSpeed's CPU Adam with offload
    sharded = master + optimizer_state_bytes(kind, shapes, 4, {} if offload else cfg.optim.args)
    # gradients: a 16-bit partition on the GPU (all of them below stage 2); with offload they are reduced straight
    # into fp32 partitions in host RAM; either way through a reduce bucket
    partition = 0 if offload else n_trained * half // (gpus if ds.stage >= 2 else 1)
    grads = partition + min(n_trained, ZERO_BUCKET_ELEMENTS) * half
    temporaries = 0 if offload else _step_temporaries(cfg, trained, 4) // gpus
    return [
        Line(f"trained weights ({'16' if half == 2 else '32'}-bit, ZeRO-{ds.stage})", weights, host_weights),
        Line("gradients (+ reduce bucket)", grads, n_trained * 4 if offload else 0, note="host: fp32 partitions"),
        Line(
            f"fp32 master + {'CPU Adam' if offload else kind} states",
            0 if offload else sharded // gpus,
            sharded if offload else 0,
        ),
        Line("optimizer step temporaries", temporaries, phase="step"),
    ]


def _host_lines(cfg: FinetuneConfig, parts: Sequence[Part], gpus: int) -> list[Line]:
    """Host RAM: each process reads the whole checkpoint and builds fp32 models at load; then per-process overhead,
    DataLoader workers, and the fp32 base weights of frozen parts (what the outputs hold for them)."""
    n_all = sum(part.params for part in parts)
    frozen = sum(p.params * 4 for p in parts if p.name in PART_ATTRS and not cfg.optim.part_lrs[p.name])
    single_file = cfg.model.base.suffix == ".safetensors"
    load = (n_all * 4 + (n_all * 2 if single_file else 0)) * gpus
    note = "fp16 single file read whole + fp32 models, per process" if single_file else "fp32 models, per process"
    workers = cfg.train.num_workers * WORKER_HOST_BYTES * gpus
    return [
        Line("model loading (peak at start)", 0, load, phase="load", note=note),
        Line("processes + DataLoader workers (assumed)", 0, PROCESS_HOST_BYTES * gpus + workers),
        *([Line("frozen parts' base weights (fp32, to save)", 0, frozen * gpus)] if frozen else []),
    ]


def _step_temporaries(cfg: FinetuneConfig, trained: Sequence[Part], dtype_bytes: int) -> int:
    """torch AdamW with foreach allocates sqrt(exp_avg_sq) for a whole param group (one group per part) at
    each step; fused AdamW and the per-tensor optimizers only need temporaries the size of one tensor."""
    sizes = [sum(math.prod(s) for s in part.trained_shapes) for part in trained]
    largest = max((math.prod(s) for part in trained for s in part.trained_shapes), default=0)
    foreach = cfg.optim.name == "adamw" and not cfg.optim.args.get("fused") and cfg.optim.args.get("foreach", True)
    return max(sizes) * dtype_bytes if foreach else 2 * largest * 4


def optimizer_state_bytes(name: str, shapes: Sequence[tuple[int, ...]], dtype_bytes: int, args: Mapping) -> int:
    """Bytes of optimizer state for parameters of ``shapes`` in ``dtype_bytes``, per the optimizer's own code.

    adamw: exp_avg + exp_avg_sq in the parameter dtype, a 4-byte step per tensor (+ max_exp_avg_sq with amsgrad).
    adamw8bit / lion8bit: 2 / 1 uint8 states with an fp32 absmax per 256 values (fp32 states under 4096 values).
    lion: exp_avg. adafactor, came: fp32 row/column second moments for >= 2-D tensors (over the last two axes),
    full for 1-D, and a 0-d RMS per tensor; came adds exp_avg and two residual factors, adafactor adds exp_avg if
    beta1 is set.
    prodigy: s and p0 (every slice_p-th value), exp_avg, exp_avg_sq.
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        factored = math.prod(shape[:-1]) + math.prod((*shape[:-2], shape[-1])) if len(shape) >= 2 else None
        total += _state_bytes(name, n, factored, dtype_bytes, args)
    return total


def _state_bytes(name: str, n: int, factored: int | None, dtype_bytes: int, args: Mapping) -> int:
    if name == "adamw":
        return (3 if args.get("amsgrad") else 2) * n * dtype_bytes + 4
    if name in ("adamw8bit", "lion8bit"):
        states = 2 if name == "adamw8bit" else 1
        return states * (n + 4 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_8BIT else 4 * n)
    if name == "lion":
        return n * dtype_bytes
    if name == "adafactor":  # + the 0-d fp32 "RMS" tensor
        second = 4 * (factored if factored is not None else n)
        return second + (4 * n if args.get("beta1") is not None else 0) + 4
    if name == "came":  # + the 0-d "RMS" tensor in the parameter dtype
        return 4 * n + 4 * (2 * factored if factored is not None else n) + dtype_bytes
    if name == "prodigy":
        sliced = math.ceil(n / int(args.get("slice_p", 1)))
        beta1 = float(args.get("betas", (0.9, 0.999))[0])
        return (2 * sliced + (2 if beta1 > 0 else 1) * n) * dtype_bytes
    raise ValueError(f"unknown optimizer {name!r}")
