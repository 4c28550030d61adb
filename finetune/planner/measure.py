"""Activation memory of the training forward, measured on the meta device (shapes only: no memory, no weights).

``measure_sdxl``: activation memory of one training forward. Each part is set up as
``finetune.model.setup_trainable`` does (trained parts in the master dtype, frozen ones in the mixed-precision
dtype) and run forward once; every tensor autograd saves for the backward pass is counted once per storage,
leaving out the parameters themselves. What is emulated, and therefore an estimate:
- CUDA autocast: matmuls, linears, convolutions and attention take low-precision copies of their inputs; norms,
  softmax, exp and pow run in fp32 (PyTorch's CUDA autocast op lists). Autocast caches the low-precision copy of
  every trained weight for the whole forward: those copies are reported apart, as ``weight_copies``.
- Attention (``sdpa``) as the fused GPU kernels (flash / memory-efficient) keep it: query, key, value, output and
  the log-sum-exp, never the attention matrix. ``eager`` attention runs as written (attention matrices saved).
- Gradient checkpointing: the forward keeps each checkpointed block's inputs plus what the code outside the blocks
  saves; the backward recomputes one block at a time, whose saved tensors are then alive once more.
Not counted: allocator fragmentation, cuBLAS/cuDNN workspaces and the transient gradients of the backward pass.
On a real CPU forward of the tiny model in fp32 the count equals the bytes autograd saves (tested).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from finetune.planner.parts import build_part
from xlbake.sdxl.parts import PART_ATTRS

LOW_PRECISION_OPS = frozenset(
    {
        F.linear,
        F.conv1d,
        F.conv2d,
        torch.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.baddbmm,
        torch.addmm,
        torch.einsum,
    }
)
"""Calls that CUDA autocast runs in fp16/bf16."""
FP32_OPS = frozenset(
    {
        F.group_norm,
        F.layer_norm,
        F.softmax,
        torch.softmax,
        torch.Tensor.softmax,
        F.log_softmax,
        torch.exp,
        torch.Tensor.exp,
        torch.pow,
        torch.Tensor.pow,
        torch.Tensor.__pow__,
        torch.rsqrt,
        F.mse_loss,
    }
)
"""Calls that CUDA autocast runs in fp32."""


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes of activation memory of one forward pass (for the whole batch)."""

    saved: int
    """Saved for the backward pass without gradient checkpointing."""
    checkpointed: int
    """Kept from forward to backward with gradient checkpointing (block inputs and saves outside the blocks)."""
    largest_block: int
    """Saved by the largest checkpointed block, alive again while the backward recomputes it."""
    weight_copies: int
    """Autocast's low-precision copies of the trained weights, cached for the whole forward."""

    def kept(self, checkpointing: bool) -> int:
        """Activation bytes alive at the start of the backward pass, with or without checkpointing."""
        return self.checkpointed + self.largest_block if checkpointing else self.saved


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for flash / memory-efficient attention: saves what those kernels save."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *extra: torch.Tensor):
        shape = (*query.shape[:-1], value.shape[-1])
        if query.ndim == 4:  # (B, heads, L, E): the kernels write (B, L, heads, E) memory, so the merge is a view
            out = query.new_empty((shape[0], shape[2], shape[1], shape[3])).transpose(1, 2)
        else:
            out = query.new_empty(shape)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp, *extra)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> None:
        raise RuntimeError("shape-only attention: for memory measurement, never differentiated")


class _Recorder(TorchFunctionMode):
    """Emulates CUDA autocast (when ``low`` is a dtype) and counts saved tensors by storage, per frame."""

    def __init__(self, low: torch.dtype | None, params: set[int]) -> None:
        super().__init__()
        self.low, self.params = low, params
        self.copies: dict[int, torch.Tensor] = {}  # id(parameter) -> its low-precision copy (autocast's cache)
        self.everything: dict[int, int] = {}  # storage -> bytes, all saves
        self.frames: list[dict[int, int]] = [{}]  # frame 0: outside checkpointed blocks; then the open block
        self.largest_block = 0
        self.keep: list[torch.Tensor] = []  # holds saved tensors so that storage ids stay unique

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.params:
            self._add(self.frames[-1], tensor)
            self.everything[storage._cdata] = storage.nbytes()
        return tensor

    def _add(self, frame: dict[int, int], tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        frame[storage._cdata] = storage.nbytes()
        self.keep.append(tensor)

    def checkpoint(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """Stands in for ``torch.utils.checkpoint.checkpoint``: same result, saves counted in a frame of its own."""
        if len(self.frames) > 1:  # nested: recomputed with the enclosing block
            return function(*args, **kwargs)
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, torch.Tensor) and arg.untyped_storage()._cdata not in self.params:
                self._add(self.frames[0], arg)
        self.frames.append({})
        try:
            return function(*args, **kwargs)
        finally:
            self.largest_block = max(self.largest_block, sum(self.frames.pop().values()))

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if isinstance(value, torch.nn.Parameter):
            if id(value) not in self.copies:
                self.copies[id(value)] = value.to(dtype)
                self.params.add(self.copies[id(value)].untyped_storage()._cdata)
            return self.copies[id(value)]
        return value.to(dtype)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = (self._cast(t, self.low) if self.low else t for t in args[:3])
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            return _FusedAttention.apply(query, key, value, *([mask] if isinstance(mask, torch.Tensor) else []))
        if self.low is not None and func in LOW_PRECISION_OPS:
            args = tuple(self._cast(a, self.low) for a in args)
        elif self.low is not None and func in FP32_OPS:
            args = tuple(self._cast(a, torch.float32) for a in args)
        return func(*args, **kwargs)

    def result(self) -> ActivationBytes:
        return ActivationBytes(
            saved=sum(self.everything.values()),
            checkpointed=sum(self.frames[0].values()),
            largest_block=self.largest_block,
            weight_copies=sum(c.numel() * c.element_size() for c in self.copies.values()),
        )


@contextlib.contextmanager
def _recording(recorder: _Recorder) -> Iterator[None]:
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t), recorder:
        yield


def measure_forward(
    modules: Mapping[str, torch.nn.Module],
    run: Callable[[], Any],
    *,
    low: torch.dtype | None,
    checkpointing: bool,
) -> ActivationBytes:
    """Run ``run()`` (a forward through ``modules``) while counting what autograd saves.

    ``low``: the autocast dtype to emulate, or None (weights already in their compute dtype). With
    ``checkpointing``, every submodule of a trained module that supports gradient checkpointing is switched to a
    counting stand-in, so pass instances built for measuring.
    """
    params = {p.untyped_storage()._cdata for m in modules.values() for p in m.parameters()}
    recorder = _Recorder(low, params)
    if checkpointing:
        for module in modules.values():
            if any(p.requires_grad for p in module.parameters()):
                for sub in module.modules():
                    if hasattr(sub, "gradient_checkpointing"):
                        sub.gradient_checkpointing, sub._gradient_checkpointing_func = True, recorder.checkpoint
    with _recording(recorder):
        run()
    return recorder.result()


def measure_sdxl(
    configs: Mapping[str, Mapping[str, Any]],
    *,
    trained: Mapping[str, bool],
    mixed: str,
    full_bf16: bool,
    attention: str,
    latent_hw: tuple[int, int],
    batch: int,
    windows: int,
) -> ActivationBytes:
    """Activation memory of the SDXL training forward (TE1, TE2, UNet) for a batch of latents (B, C, h, w).

    ``configs``: constructor kwargs of "unet", "text_encoder", "text_encoder_2" (as ``xlbake.sdxl.configs``);
    ``trained``: part ("unet", "te1", "te2") -> whether it trains; ``mixed``: "no" | "fp16" | "bf16" (fp16 and
    bf16 take the same bytes, so both are measured as fp16); ``windows``: 77-token windows per caption. Each part
    is measured once per process at batch 1 and scaled by ``batch`` (every saved tensor is batch-major).
    """
    total = ActivationBytes(0, 0, 0, 0)
    text_grad = bool(trained.get("te1") or trained.get("te2"))
    for part, name in PART_ATTRS.items():
        if not trained.get(part) and not (part == "unet" and text_grad):
            continue  # a frozen text encoder saves nothing: its input (token ids) needs no gradient
        trains = bool(trained.get(part))
        spec = {
            "part": part,
            "config": configs[name],
            "trained": trains,
            "text_grad": text_grad or trains,  # a trained UNet saves nearly the same either way: measure once
            "low": mixed != "no",
            "attention": attention,
            "latent_hw": list(latent_hw),
            "windows": windows,
        }
        one = _measure_part(json.dumps(spec, sort_keys=True))
        total = ActivationBytes(
            total.saved + one.saved * batch,
            total.checkpointed + one.checkpointed * batch,
            max(total.largest_block, one.largest_block * batch),
            total.weight_copies + (0 if full_bf16 else one.weight_copies),
        )
    return total


@functools.lru_cache(maxsize=64)
def _measure_part(key: str) -> ActivationBytes:
    """One part's training forward at batch 1 (``key``: the JSON spec built by ``measure_sdxl``)."""
    from accelerate import init_empty_weights

    from finetune.text import WINDOW

    spec = json.loads(key)
    part, trained, low = spec["part"], spec["trained"], torch.float16 if spec["low"] else None
    with init_empty_weights():
        module = build_part(PART_ATTRS[part], spec["config"])
    dtype = torch.float32 if trained or low is None else low
    torch.nn.Module.to(module, dtype)  # the plain Module.to: diffusers' own warns about fp32 modules on every cast
    module.requires_grad_(trained).train(trained)
    _set_attention(module, spec["attention"])
    if part == "unet":
        config = module.config
        embeds = torch.zeros((1, WINDOW * spec["windows"], config.cross_attention_dim), device="meta")
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.zeros((1, pooled_dim), device="meta").requires_grad_(spec["text_grad"]),
            "time_ids": torch.zeros((1, 6), device="meta"),
        }
        latents = torch.zeros((1, config.in_channels, *spec["latent_hw"]), device="meta")
        timesteps = torch.zeros((1,), dtype=torch.long, device="meta")
        inputs = (latents, timesteps, embeds.requires_grad_(spec["text_grad"]))

        def run() -> None:
            module(*inputs, added_cond_kwargs=added)
    else:
        ids = torch.zeros((spec["windows"], WINDOW), dtype=torch.long, device="meta")

        def run() -> None:
            module(ids, output_hidden_states=True)

    return measure_forward({part: module}, run, low=low, checkpointing=trained)


def _set_attention(module: torch.nn.Module, attention: str) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if isinstance(module, UNet2DConditionModel):
        module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    else:
        module.set_attn_implementation(attention)
