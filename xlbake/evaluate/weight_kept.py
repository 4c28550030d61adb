"""What a LoRA keeps of a finetune in weight space, in the words of extract's and resize's reports: "covered", the
share of the finetune's ‖ΔW‖² (every UNet and text encoder tensor) in the tensors the LoRA changes; what it leaves
out, by kind; "kept of finetune", ``1 - sum ‖ΔW_lora - ΔW‖² / sum ‖ΔW‖²`` over all those tensors ("kept of covered",
the same over its own: ``FidelityResult.kept_of_covered``). Also how a LoRA's modules change SGM weights, which
``xlbake.evaluate.fidelity`` uses to merge them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from xlbake.errors import InputError
from xlbake.lora.io import LoraFile, LoraModule
from xlbake.lora.names import LoraTarget
from xlbake.lora.report import left_out_kind
from xlbake.sdxl.checkpoint import CheckpointReader


@dataclass(frozen=True)
class Update:
    """One LoRA module's change to an SGM weight: to all of it, or to rows ``rows`` of a fused TE2 ``in_proj``.

    Holds the factors, not the delta: a full-size delta per layer would not fit in memory for several LoRAs.
    """

    rows: tuple[int, int] | None
    module: LoraModule
    shape: tuple[int, ...]  # the (sliced) weight's shape

    def delta(self) -> Tensor:
        """The change in fp32: ``shape``."""
        return self.module.delta().reshape(self.shape)


@dataclass(frozen=True)
class WeightKept:
    """What one LoRA keeps of the finetune's weight difference ‖ΔW‖² (UNet and text encoders)."""

    kept_of_finetune: float  # 1 - Σ‖ΔW_lora - ΔW‖² / Σ‖ΔW‖²
    covered: float  # share of Σ‖ΔW‖² in the tensors the LoRA changes
    left_out: dict[str, float]  # kind -> share of Σ‖ΔW‖² in tensors it does not change


def lora_updates(lora: LoraFile, targets: dict[str, LoraTarget]) -> dict[str, list[Update]]:
    """SGM key -> the updates ``lora`` makes to it; InputError for modules that fit no layer of ``targets``."""
    updates: dict[str, list[Update]] = {}
    unknown = []
    for name, module in lora.modules.items():
        target = targets.get("lora_te1_" + name[len("lora_te_") :] if name.startswith("lora_te_") else name)
        if target is None:
            unknown.append(name)
            continue
        shape = (module.up.shape[0], *module.down.shape[1:])
        if torch.Size(shape).numel() != torch.Size(target.shape).numel():
            raise InputError(
                f"{lora.path}: module {name} changes a {shape} weight but {target.key} is "
                f"{target.shape}; the LoRA was made for another model"
            )
        updates.setdefault(target.key, []).append(Update(target.rows, module, target.shape))
    if unknown:
        raise InputError(
            f"{lora.path}: {len(unknown)} module(s) match no layer of the base model, e.g. {unknown[:3]}; "
            "the LoRA was made for another architecture"
        )
    return updates


def merged(weight: Tensor, updates: Sequence[Update]) -> Tensor:
    """``weight`` (SGM shape) in fp32 with every update added (to its row block where it has one)."""
    out = weight.float().clone()
    for update in updates:
        rows = slice(*update.rows) if update.rows else slice(None)
        out[rows] += update.delta()
    return out


def weight_energies(
    base: CheckpointReader,
    tuned: CheckpointReader,
    keys: Sequence[str],
    updates: Sequence[dict[str, list[Update]]],
    targets: Sequence[LoraTarget],
) -> list[WeightKept]:
    """What each LoRA keeps of ‖tuned - base‖² over the float tensors of ``keys`` (1.0 each if nothing changed).

    A tensor no LoRA module changes is left out under its kind: LoRA layers as "3x3 convs" or "<component> layers",
    others by :func:`xlbake.lora.report.left_out_kind`.
    """
    components = {t.key: ("3x3 convs" if t.kind == "conv3x3" else f"{t.component} layers") for t in targets}
    total, errors = 0.0, [0.0] * len(updates)
    covered = [0.0] * len(updates)
    left_out: list[dict[str, float]] = [{} for _ in updates]
    for key in keys:
        if not base.dtype(key).is_floating_point:
            continue
        difference = tuned.get(key).float() - base.get(key).float()
        energy = difference.double().square().sum().item()
        total += energy
        for index, lora in enumerate(updates):
            if key in lora:
                covered[index] += energy
                change = merged(torch.zeros_like(difference), lora[key])
                errors[index] += (difference - change).double().square().sum().item()
            else:
                errors[index] += energy
                kind = components.get(key) or left_out_kind(key, tuple(difference.shape))
                left_out[index][kind] = left_out[index].get(kind, 0.0) + energy
    if total <= 0:
        return [WeightKept(1.0, 1.0, {}) for _ in updates]
    return [
        WeightKept(1.0 - error / total, part / total, {k: v / total for k, v in out.items() if v > 0})
        for error, part, out in zip(errors, covered, left_out, strict=True)
    ]
