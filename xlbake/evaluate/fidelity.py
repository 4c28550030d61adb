"""How much of a finetune each LoRA keeps, measured on what the model does rather than on its weights.

On a fixed set of inputs (noisy latents, timesteps spread over the schedule, prompts; or a dataset's held-out images
and their captions, see :mod:`xlbake.evaluate.fidelity_inputs`) the UNet predicts with the base, the tuned model
and base + each LoRA; the kept effect of a LoRA is

    kept = 1 - sum ‖ε(base+LoRA) - ε(tuned)‖² / sum ‖ε(base) - ε(tuned)‖²

(1: the LoRA does exactly what the finetune did; 0: no better than the base; below 0: worse than the base). A LoRA
is applied by adding its deltas to the base weights in SGM key space (TE2's fused ``in_proj`` by row block), text
encoders included, since a LoRA on the text encoders changes the conditioning. Beside it, what the weights say
(``xlbake.evaluate.weight_kept``).

One set of modules is built and its weights are swapped in place, tensor by tensor from the checkpoint readers:
one UNet on the device at any time, predictions kept on the CPU.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from xlbake.errors import InputError
from xlbake.evaluate.fidelity_inputs import FidelityInputs, make_inputs
from xlbake.evaluate.grid import ModelWeights
from xlbake.evaluate.weight_kept import Update, WeightKept, lora_updates, merged, weight_energies
from xlbake.lora.io import LoraFile, read_lora
from xlbake.lora.names import kohya_targets
from xlbake.lora.report import BYTES_PER_MB
from xlbake.sdxl.checkpoint import CheckpointReader, open_checkpoint
from xlbake.sdxl.keys import SGM_PREFIX
from xlbake.sdxl.models import Architecture, resolve_architecture
from xlbake.sdxl.parts import MODEL_PARTS

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of a person", "a landscape painting", "a simple emblem on a plain background", "")
"""Prompts used when none are given (better: the dataset's captions)."""


@dataclass(frozen=True)
class FidelityResult:
    """What one LoRA file keeps of the finetune, in function space and in weight space."""

    lora: Path
    min_rank: int
    max_rank: int
    params: int
    file_mb: float
    kept_effect: float  # 1 - ‖ε(base+LoRA) - ε(tuned)‖² / ‖ε(base) - ε(tuned)‖² over all inputs
    kept_energy: float  # kept of finetune: 1 - ‖ΔW_lora - ΔW‖² / ‖ΔW‖² over every UNet and text-encoder tensor
    error: float  # mean squared difference per prediction element, ε(base+LoRA) vs ε(tuned)
    reference: float  # the same for ε(base) vs ε(tuned): the finetune's whole effect
    covered: float = 1.0  # share of ‖ΔW‖² in the tensors the LoRA changes
    left_out: Mapping[str, float] = field(default_factory=dict)  # kind of tensor -> its share of ‖ΔW‖²

    @property
    def ranks(self) -> str:
        return str(self.max_rank) if self.min_rank == self.max_rank else f"{self.min_rank}-{self.max_rank}"

    @property
    def kept_of_covered(self) -> float:
        """1 - ‖ΔW_lora - ΔW‖² / ‖ΔW‖² over the tensors the LoRA changes (kept of finetune = this x covered)."""
        return self.kept_energy / self.covered if self.covered > 0 else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "lora": str(self.lora),
            "ranks": self.ranks,
            "left_out": dict(self.left_out),
            "kept_of_covered": self.kept_of_covered,
        }


def kept_effect(pred: Tensor, tuned: Tensor, base: Tensor) -> float:
    """1 - ‖pred - tuned‖² / ‖base - tuned‖² (any equal shapes, summed in fp64).

    If base equals tuned there is nothing to keep: 1.0 when pred equals them too, else -inf.
    """
    reference = (base.double() - tuned.double()).square().sum().item()
    error = (pred.double() - tuned.double()).square().sum().item()
    if reference == 0.0:
        return 1.0 if error == 0.0 else float("-inf")
    return 1.0 - error / reference


@torch.no_grad()
def encode_prompts(
    arch: Architecture, models: dict[str, torch.nn.Module], prompts: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """SDXL conditioning of ``prompts``: (P, 77, d1 + d2) penultimate hidden states of both encoders, (P, p) pooled.

    As the diffusers SDXL pipeline does: one 77-token window per encoder, pooled = TE2's projected output.
    """
    hidden, pooled = [], None
    for tokenizer, part in ((arch.tokenizer, "text_encoder"), (arch.tokenizer_2, "text_encoder_2")):
        encoder = models[part]
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if part == "text_encoder_2" else pooled
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def predict(arch: Architecture, models: dict[str, torch.nn.Module], inputs: FidelityInputs, batch_size: int) -> Tensor:
    """The UNet's prediction for every input with the models' current weights: (N, 4, h, w) fp32 on the CPU."""
    unet = models["unet"]
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    embeds, pooled = encode_prompts(arch, models, inputs.prompts)
    out = []
    for start in range(0, len(inputs.latents), batch_size):
        index = slice(start, start + batch_size)
        prompt = inputs.prompt_index[index].to(device)
        added = {"text_embeds": pooled[prompt].to(dtype), "time_ids": inputs.time_ids[index].to(device, dtype)}
        sample = unet(
            inputs.latents[index].to(device, dtype),
            inputs.timesteps[index].to(device),
            encoder_hidden_states=embeds[prompt].to(dtype),
            added_cond_kwargs=added,
        ).sample
        out.append(sample.float().cpu())
    return torch.cat(out)


def measure_fidelity(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    loras: Sequence[str | os.PathLike],
    *,
    n_samples: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    prompts: Sequence[str] = (),
    components: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    latent_size: int | None = None,
    batch_size: int = 4,
    inputs: Sequence[FidelityInputs] = (),
) -> list[FidelityResult]:
    """Kept effect and kept weight energy of each LoRA file (extracted from ``base`` -> ``tuned``), in order.

    ``base``/``tuned``: single-file SDXL safetensors or diffusers folders of one architecture; ``components``
    supplies configs and tokenizers for single files of unknown size (see
    :func:`xlbake.sdxl.models.resolve_architecture`).
    ``inputs`` (e.g. :func:`xlbake.evaluate.fidelity_inputs.dataset_inputs`' groups) default to ``n_samples`` random
    ones (``make_inputs`` with ``prompts``, default ``DEFAULT_PROMPTS``, and ``latent_size``, default the UNet's
    ``sample_size``). ``dtype`` defaults to fp32 on the CPU and fp16 on a GPU. InputError for files that do not fit
    each other or a finetune with no effect.
    """
    from diffusers import DDPMScheduler

    base, tuned, device = Path(base), Path(tuned), torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    files = [read_lora(path) for path in loras]
    arch = resolve_architecture(base, components)
    with open_checkpoint(base) as base_reader, open_checkpoint(tuned) as tuned_reader:
        keys = _model_keys(base_reader, tuned_reader)
        targets = {t.name: t for t in kohya_targets(base_reader.shapes(), conv=True, extra=True)}
        updates = [lora_updates(lora, targets) for lora in files]
        energies = weight_energies(base_reader, tuned_reader, keys, updates, list(targets.values()))
        weights = ModelWeights.load(base_reader, arch, MODEL_PARTS, device=device, dtype=dtype)
        if not inputs:
            size = latent_size or int(arch.unet["sample_size"])
            alphas = DDPMScheduler.from_config(arch.scheduler).alphas_cumprod
            prompts = list(prompts) or DEFAULT_PROMPTS
            inputs = [make_inputs(n_samples, (size, size), prompts, alphas, seed=seed, vae_scale=arch.vae_scale)]
        count = sum(len(group.latents) for group in inputs)
        logger.info("fidelity: %d inputs in %d latent size(s), %d LoRA(s)", count, len(inputs), len(files))
        base_pred, lora_preds, tuned_pred = _predict_variants(
            arch, weights, inputs, batch_size, base_reader, tuned_reader, keys, updates
        )
    reference = (base_pred - tuned_pred).double().square().mean().item()
    if reference == 0.0:
        raise InputError(f"{tuned}: predicts exactly as {base} on every input; there is no finetune effect to measure")
    return [
        _result(lora, pred, tuned_pred, base_pred, energy)
        for lora, pred, energy in zip(files, lora_preds, energies, strict=True)
    ]


def _predict_variants(
    arch: Architecture,
    weights: ModelWeights,
    inputs: Sequence[FidelityInputs],
    batch_size: int,
    base: CheckpointReader,
    tuned: CheckpointReader,
    keys: Sequence[str],
    updates: Sequence[dict[str, list[Update]]],
) -> tuple[Tensor, list[Tensor], Tensor]:
    """Predictions (flattened over all ``inputs``) of the base, base + each LoRA, then the tuned model, swapping
    weights in place in that order."""

    def predict_all() -> Tensor:
        return torch.cat([predict(arch, weights.models, group, batch_size).flatten() for group in inputs])

    base_pred = predict_all()
    lora_preds = []
    for index, lora in enumerate(updates, start=1):
        logger.info("fidelity: LoRA %d/%d (%d weights changed)", index, len(updates), len(lora))
        for key, parts in lora.items():
            weights.set(key, merged(base.get(key), parts))
        lora_preds.append(predict_all())
        for key in lora:
            weights.set(key, base.get(key))
    for key in keys:
        weights.set(key, tuned.get(key))
    return base_pred, lora_preds, predict_all()


def fidelity_table(results: Sequence[FidelityResult]) -> str:
    """A compact table: file, rank(s), MB, covered, kept of covered, kept of finetune (weights), kept effect."""
    width = max([len(r.lora.name) for r in results] + [4])
    header = f"{'covered':>9}{'kept of covered':>17}{'kept of finetune':>18}{'kept effect':>13}"
    lines = [f"{'file':<{width}}  {'rank(s)':<9}{'MB':>9}{header}"]
    for r in results:
        lines.append(
            f"{r.lora.name:<{width}}  {r.ranks:<9}{r.file_mb:>9.2f}{r.covered * 100:>8.1f}%"
            f"{r.kept_of_covered * 100:>16.2f}%{r.kept_energy * 100:>17.2f}%{r.kept_effect * 100:>12.2f}%"
        )
    return "\n".join(lines)


def prompts_from_dataset(root: str | os.PathLike, limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct captions of a kohya-layout dataset, picked with ``seed`` (InputError if none)."""
    from xlbake.data.kohya import scan_dataset

    captions = sorted({item.caption for subset in scan_dataset([Path(root)]).subsets for item in subset.items})
    if not captions:
        raise InputError(f"{root}: no captioned images found; pass prompts instead, or a kohya dataset folder")
    return random.Random(seed).sample(captions, min(limit, len(captions)))


def _model_keys(base: CheckpointReader, tuned: CheckpointReader) -> list[str]:
    """The UNet and text encoder keys, checked to have the same shapes in both checkpoints."""
    prefixes = tuple(SGM_PREFIX[part] for part in MODEL_PARTS)
    keys = [key for key in base if key.startswith(prefixes)]
    tuned_keys = {key for key in tuned if key.startswith(prefixes)}
    for key in keys:
        if key not in tuned_keys or tuned.shape(key) != base.shape(key):
            raise InputError(f"{tuned.path}: {key} is missing or differs in shape from {base.path}; not the same model")
    return keys


def _result(lora: LoraFile, pred: Tensor, tuned: Tensor, base: Tensor, energy: WeightKept) -> FidelityResult:
    ranks = [module.rank for module in lora.modules.values()]
    return FidelityResult(
        lora=lora.path,
        min_rank=min(ranks),
        max_rank=max(ranks),
        params=sum(module.params for module in lora.modules.values()),
        file_mb=lora.path.stat().st_size / BYTES_PER_MB,
        kept_effect=kept_effect(pred, tuned, base),
        kept_energy=energy.kept_of_finetune,
        error=(pred - tuned).double().square().mean().item(),
        reference=(base - tuned).double().square().mean().item(),
        covered=energy.covered,
        left_out=energy.left_out,
    )
