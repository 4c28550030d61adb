"""Several processes and DeepSpeed ZeRO: one module for the engine, collective weight gathering (the launch's
settings and what they refuse: ``finetune.launch``).

Under ``accelerate launch --num_processes N`` every process runs the whole trainer; files in RUN/ are written by the
main process only. DeepSpeed wraps exactly one module per Accelerator, so the trained parts go into one
``Denoiser``. Under ZeRO-3 each process holds only a slice of every weight: reading whole weights (to save or
sample) is a collective operation, so every process calls the gathering functions here, in the same order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from finetune.config import FinetuneConfig
from finetune.launch import ZERO3, ZeroSettings, check_zero, env_flag, zero_settings
from finetune.text import encode_prompt
from xlbake.errors import ConfigError


def setup_zero(accelerator: Any, cfg: FinetuneConfig) -> ZeroSettings | None:
    """Under DeepSpeed: check ``cfg`` against its settings, fill its ``auto`` values from ``cfg``; else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    zero = zero_settings(plugin)
    check_zero(cfg, zero)
    configure_zero(plugin, cfg)
    if zero.stage == ZERO3:
        # transformers builds its models inside zero.Init whenever the active DeepSpeed config is ZeRO-3 (whatever
        # zero3_init_flag says); our loading (a meta-device build, then the checkpoint's tensors) cannot fill split
        # weights: each process loads the whole model, prepare splits it.
        from transformers.integrations import unset_hf_deepspeed_config

        plugin.zero3_init_flag = False
        unset_hf_deepspeed_config()
    return zero


def configure_zero(plugin: Any, cfg: FinetuneConfig) -> None:
    """Fill DeepSpeed's ``auto`` batch size and clipping from ``cfg`` (our data loader is not passed to prepare)."""
    ds = plugin.deepspeed_config
    for key, value in (
        ("train_micro_batch_size_per_gpu", cfg.train.batch_size),
        ("gradient_clipping", cfg.optim.max_grad_norm),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value


class Denoiser(nn.Module):
    """SDXL's text encoders and UNet as one module: token ids and noisy latents -> the UNet's prediction.

    Only the ``trained`` parts are submodules (what DeepSpeed wraps, partitions and casts); the others are called
    but stay as they are (fp32, whole, not in the engine's state).
    """

    def __init__(self, parts: Mapping[str, nn.Module], trained: Collection[str]) -> None:
        super().__init__()
        self.trained = nn.ModuleDict({name: parts[name] for name in trained})
        self.parts = dict(parts)  # a plain dict: not registered, so not part of this module's parameters

    def forward(
        self, noisy_latents: Tensor, timesteps: Tensor, input_ids_1: Tensor, input_ids_2: Tensor, time_ids: Tensor
    ) -> Tensor:
        """noisy_latents (B, 4, h, w), timesteps (B,), input_ids_1/2 (B, C, 77), time_ids (B, 6) -> (B, 4, h, w)."""
        unet = self.parts["unet"]
        dtype = next(unet.parameters()).dtype  # DeepSpeed casts what it wraps to 16 bits, and not the inputs
        prompt_embeds, pooled_prompt_embeds = encode_prompt(
            self.parts["te1"], self.parts["te2"], input_ids_1, input_ids_2
        )
        added = {"text_embeds": pooled_prompt_embeds.to(dtype), "time_ids": time_ids.to(dtype)}
        return unet(noisy_latents.to(dtype), timesteps, prompt_embeds.to(dtype), added_cond_kwargs=added).sample


def fixed_tensors(module: nn.Module) -> dict[str, Tensor]:
    """CPU copies of a module's state-dict entries that training does not change (frozen weights, buffers).

    Taken before DeepSpeed partitions or casts them, so that saved checkpoints hold them exactly.
    """
    trained = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in trained}


def gather_state_dict(module: nn.Module, fixed: Mapping[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """The whole state dict of a module trained by DeepSpeed ZeRO (any stage), on the CPU, trained weights in fp32.

    Trained weights come from the optimizer's fp32 master copies, the rest from ``fixed`` (``fixed_tensors``).
    Collective: every process calls it with the same module; only those with ``keep`` get the tensors (the others
    an empty dict, so that one whole copy is held only where it is written).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters(remove_duplicate=False))
    out: dict[str, Tensor] = {}
    for name in module.state_dict(keep_vars=True):
        param = params.get(name)
        if param is not None and param.requires_grad:
            full = safe_get_full_fp32_param(param)  # an all-gather / all-reduce over the processes
            if keep:
                out[name] = full.detach().cpu().clone()
        elif keep:
            out[name] = fixed[name]
    return out


def trained_state_dicts(
    model: Any, parts: Sequence[str], fixed: Mapping[str, Mapping[str, Tensor]] | None, keep: bool
) -> dict[str, dict[str, Tensor]]:
    """Whole state dicts of the trained ``parts`` of an ``SdxlModel``: gathered from DeepSpeed when ``fixed``
    (part -> ``fixed_tensors``) is given, a collective where only ``keep`` processes get tensors; else the modules'."""
    if not fixed:
        return {name: model.part(name).state_dict() for name in parts}
    return {name: gather_state_dict(model.part(name), fixed[name], keep) for name in parts}


@contextlib.contextmanager
def whole_parameters(module: nn.Module, zero3: bool) -> Iterator[None]:
    """Inside: every parameter of ``module`` is whole on every process (ZeRO-3 gathers them; a collective)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def rank_seed(seed: int, rank: int) -> int:
    """The training generator's seed for a process: ``seed`` on the main one, an independent stream elsewhere.

    Every process drawing the same noise and timesteps would shrink the effective batch for those draws.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def start_processes() -> Any:
    """accelerate's process state, joined to the other processes of a launch (before any ``Accelerator``).

    accelerate joins processes only through a GPU backend, or gloo with ACCELERATE_USE_CPU (which DeepSpeed
    refuses): DeepSpeed without a GPU is given gloo here. ConfigError when launched processes stay apart.
    """
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed, cpu = env_flag("ACCELERATE_USE_DEEPSPEED"), env_flag("ACCELERATE_USE_CPU")
    if world > 1 and deepspeed and cpu:
        raise ConfigError(
            "ACCELERATE_USE_CPU=true makes accelerate skip DeepSpeed; unset it (without GPUs DeepSpeed runs on the CPU)"
        )
    gloo = world > 1 and deepspeed and not torch.cuda.is_available()
    processes = PartialState(cpu=cpu, **({"backend": "gloo"} if gloo else {}))
    if processes.num_processes != world:
        raise ConfigError(
            f"accelerate launch started {world} processes but accelerate joined {processes.num_processes}: without "
            "GPUs set ACCELERATE_USE_CPU=true for DDP (configs/accelerate/cpu-2proc-ddp.yaml), unset it for DeepSpeed"
        )
    return processes


def prepare_run_dir_once(cfg: FinetuneConfig, resume: bool, force: bool) -> Path:
    """``run_dir.prepare_run_dir`` on the main process only, the others waiting (no process sees another's files).

    If the main process refuses the folder it exits, and the launcher stops the others.
    """
    from finetune.run_dir import prepare_run_dir

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return prepare_run_dir(cfg, resume=resume, force=force)
    processes = start_processes()
    if processes.is_main_process:
        prepare_run_dir(cfg, resume=resume, force=force)
    processes.wait_for_everyone()
    return Path(cfg.run_dir)
