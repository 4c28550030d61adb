"""What an extracted LoRA covers of the whole finetune, and what is said before the first SVD.

A LoRA holds kohya's layers only; a finetune also changes 3x3 convs (without a conv dim), norms, biases,
embeddings and linear layers kohya does not target. Their share of ||tuned - base||^2 is measured by streaming
those tensors too (one at a time, a small part of the model), so the report can say what the LoRA keeps of the
whole finetune, not only of its own layers. Before factoring, the inputs' order, the rank caps that shapes impose
and the size budgets are checked from the headers alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from extract.outputs import LayerResult, Variant
from xlbake.batch.run_folder import BASE_KEY
from xlbake.errors import InputError
from xlbake.lora.names import LoraTarget
from xlbake.lora.report import Coverage, left_out_kind
from xlbake.sdxl.checkpoint import CheckpointReader
from xlbake.sdxl.keys import SGM_PREFIX

MODEL_PREFIXES = tuple(SGM_PREFIX[part] for part in ("unet", "text_encoder", "text_encoder_2"))
"""The tensors a finetune changes and a LoRA applies to (the VAE is neither trained nor in a LoRA)."""
CONV_KIND = "3x3 convs"
CHUNK_ELEMENTS = 1 << 20
"""Elements of a left-out tensor differenced in fp64 at a time: the token embeddings (63M elements in TE2) would
otherwise take ~2 GB of fp64 copies at once, more than the whole LoRA."""


def check_order(base: CheckpointReader, tuned: CheckpointReader) -> None:
    """InputError when ``base``'s metadata says it is a finetune of ``tuned`` (or of a model while ``tuned``
    names none): the two files look swapped, which would extract the negated finetune."""
    named = base.metadata.get(BASE_KEY)
    if not named or (BASE_KEY in tuned.metadata and Path(named).resolve() != tuned.path.resolve()):
        return
    raise InputError(
        f"{base.path}: its metadata says it is a finetune of {named}; --base and --tuned look swapped "
        "(pass --allow-swapped to extract anyway)"
    )


def left_out_energies(base: CheckpointReader, tuned: CheckpointReader, targeted: set[str]) -> dict[str, float]:
    """||tuned - base||^2 of every UNet and text-encoder float tensor outside ``targeted``, summed by kind."""
    tuned_shapes, totals = tuned.shapes(), {}
    for key, shape in base.shapes().items():
        if key in targeted or not key.startswith(MODEL_PREFIXES) or tuned_shapes.get(key) != shape:
            continue
        if not (base.dtype(key).is_floating_point and tuned.dtype(key).is_floating_point):
            continue
        energy = squared_distance(tuned.get(key), base.get(key))
        if not math.isfinite(energy):
            raise InputError(f"{tuned.path}: {key} holds NaN/Inf values (or {base.path} does); re-save the checkpoint")
        kind = left_out_kind(key, shape)
        totals[kind] = totals.get(kind, 0.0) + energy
    return totals


def squared_distance(a: Tensor, b: Tensor) -> float:
    """||a - b||^2 in fp64, ``CHUNK_ELEMENTS`` at a time (same shapes), in one pair of fp64 buffers reused chunk
    after chunk: fresh fp64 copies for each chunk took 10.8 ns per element of a 2M-element fp16 tensor and 2.2-2.5
    ns of a 63M-element one (their pages faulting anew), these 1.6 ns, to the same bits (1 thread)."""
    a, b = a.reshape(-1), b.reshape(-1)
    work = torch.empty(2, min(CHUNK_ELEMENTS, a.numel()), dtype=torch.float64)
    total = 0.0
    for i in range(0, a.numel(), CHUNK_ELEMENTS):
        x, y = work[:, : min(CHUNK_ELEMENTS, a.numel() - i)]
        x.copy_(a[i : i + CHUNK_ELEMENTS])
        y.copy_(b[i : i + CHUNK_ELEMENTS])
        total += float(torch.sub(x, y, out=x).square_().sum())
    return total


def variant_coverage(layers: Sequence[LayerResult], held: set[str], left_out: Mapping[str, float]) -> Coverage:
    """The share of the finetune in the layers ``held`` by one file; LoRA layers it does not hold are left out as
    3x3 convs (no conv dim) or as layers of a skipped component."""
    covered, out = 0.0, dict(left_out)
    for layer in layers:
        if layer.target.name in held:
            covered += layer.energy
            continue
        kind = CONV_KIND if layer.target.kind == "conv3x3" else f"skipped {layer.target.component}"
        out[kind] = out.get(kind, 0.0) + layer.energy
    total = covered + sum(out.values())
    if total <= 0:
        return Coverage(1.0)
    shares = sorted(((kind, energy / total) for kind, energy in out.items() if energy > 0), key=lambda p: -p[1])
    return Coverage(covered / total, dict(shares))


def full_rank(target: LoraTarget) -> int:
    return min(target.shape[0], math.prod(target.shape[1:]))


def cap_notes(variants: Sequence[Variant], targets: Sequence[LoraTarget]) -> list[str]:
    """One line per file in which some layers' full rank is below the rank asked for (so they are capped at it)."""
    notes, seen = [], {}
    for variant in variants:
        asked = {t.name: variant.conv_dim if t.kind == "conv3x3" else variant.dim for t in targets}
        held = [t for t in targets if asked[t.name] > 0]
        capped = [t for t in held if full_rank(t) < asked[t.name]]
        ranks = tuple(min(full_rank(t), asked[t.name]) for t in held)
        same = seen.setdefault(ranks, variant.path.stem)
        if not capped:
            continue
        groups: dict[str, list[int]] = {}
        for target in capped:
            groups.setdefault(target.component, []).append(full_rank(target))
        parts = ", ".join(f"{c} {len(r)} at {_span(r)}" for c, r in groups.items())
        conv = f", 3x3 convs {variant.conv_dim}" if variant.conv_dim else ""
        line = (
            f"{variant.path.stem}: {len(capped)} of {len(held)} layers have a full rank below the rank asked "
            f"({variant.dim}{conv}) and are capped at it ({parts})"
        )
        notes.append(line + (f"; the same ranks as {same}" if same != variant.path.stem else ""))
    return notes


def budget_notes(
    variants: Sequence[Variant], targets: Sequence[LoraTarget], budget_params: Callable[[Variant, list[str]], int]
) -> list[str]:
    """One line per size budget that the rank caps reach first (the file comes out smaller than the budget).

    ``budget_params(variant, names)``: the budget in parameters for a file of those modules (ConfigError when the
    budget cannot hold even the header).
    """
    notes = []
    for variant in variants:
        if variant.budget is None:
            continue
        held = [t for t in targets if (variant.conv_dim if t.kind == "conv3x3" else variant.dim) > 0]
        most = sum(
            min(full_rank(t), variant.conv_dim if t.kind == "conv3x3" else variant.dim)
            * (t.shape[0] + math.prod(t.shape[1:]))
            for t in held
        )
        if budget_params(variant, [t.name for t in held]) >= most:
            notes.append(
                f"size {variant.budget.text}: the rank cap --dim {variant.dim} comes first: every layer at its cap "
                f"holds {most} parameters, less than the budget; raise --dim to use more of it"
            )
    return notes


def _span(ranks: Sequence[int]) -> str:
    low, high = min(ranks), max(ranks)
    return str(low) if low == high else f"{low}-{high}"
