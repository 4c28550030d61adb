"""Input statistics for calibrated (activation-aware) extraction: C = E[x xᵀ] of every LoRA layer's inputs.

One pass of the *base* model over a few of the finetune's own images and captions: each image is encoded by the
VAE, noised at timesteps spread over the schedule (fixed seeds), and the UNet and both text encoders run on it with
a forward pre-hook on one Linear / 1x1 conv per distinct layer input (xlbake.lora.calibration.moment_group: q/k/v,
all cross-attention k/v, all time-embedding projections share one), each summing x xᵀ over its input rows in fp32
on the pass's device. Each moment is then compressed (xlbake.lora.moments.compress: top eigenpairs + isotropic
remainder) and written to RUN/calibration.safetensors (xlbake.lora.calibration.write_calibration), which is reused
when present.

What it reads of the run is its ``config.resolved.yaml`` (dataset roots or TOML, caption settings, resolution and
bucket limits), through the core dataset reader; it never imports the finetune stage. By default only the
calibration half of the images is used (:func:`xlbake.data.run_images.split_items`), so that
``xlbake fidelity --inputs dataset`` can measure on the held-out half. Captions are used raw (no
prefix, trigger or shuffle handling) and each image is resized to the bucket of its aspect ratio nearest to
``resolution``² pixels. A 3x3 conv's hook also sums the products between its kernel taps (Kronecker statistics, see
:mod:`xlbake.lora.whiten`).

Size on real SDXL: the file holds one compressed moment per group (xlbake.lora.calibration.statistics_bytes), about
0.61 GB instead of 17 GB for dense per-module moments; the fp32 accumulators of the pass hold the dense moments
of the 675 groups, 13.6 GB on the device besides the models (the 92 5120-wide feed-forward inputs are 9.6 GB).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from extract.config import ExtractConfig
from xlbake.data.kohya import Item
from xlbake.data.run_images import RunData, bucket_size, load_pixels, read_run, run_items, split_items
from xlbake.devices import resolve_device
from xlbake.errors import InputError
from xlbake.evaluate.fidelity import encode_prompts
from xlbake.evaluate.grid import ModelWeights
from xlbake.fingerprint import fingerprint
from xlbake.lora.calibration import (
    Calibration,
    calibrated_targets,
    moment_for,
    moment_group,
    read_calibration,
    summary,
    write_calibration,
)
from xlbake.lora.moments import KronWhitening, Whitening, compress, moment_whitening, tap_moment
from xlbake.lora.names import LoraTarget
from xlbake.lora.whiten import DAMPING
from xlbake.sdxl.checkpoint import open_checkpoint
from xlbake.sdxl.keys import plan_from_sgm, with_text_model
from xlbake.sdxl.models import Architecture, resolve_architecture
from xlbake.sdxl.parts import MODEL_PARTS, TEXT_PARTS

LOG = logging.getLogger(__name__)
CALIBRATION_NAME = "calibration.safetensors"
CALIBRATION_IMAGES = 16
"""Images of the run used by default: a few suffice for the dominant input directions of each layer."""
TIMESTEPS_PER_IMAGE = 4


def hooked_modules(
    models: Mapping[str, torch.nn.Module], shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.nn.Module]:
    """Moment group -> the module whose input the group's LoRA layers read (its first member's, see
    :func:`target_modules`)."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in target_modules(models, shapes).items():
        found.setdefault(moment_group(name), module)
    return found


def target_modules(
    models: Mapping[str, torch.nn.Module], shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.nn.Module]:
    """kohya module name -> the Linear / 1x1 Conv2d of ``models`` whose input that LoRA layer sees, for every
    non-3x3 LoRA layer of a checkpoint with SGM ``shapes`` (TE2's q, k and v: their own projections)."""
    plan = plan_from_sgm(shapes)
    names = {
        part: {with_text_model(n) if part in TEXT_PARTS else n: n for n, _ in model.named_parameters()}
        for part, model in models.items()
    }
    found = {}
    for target in calibrated_targets(shapes):
        entry = plan[target.key]
        if entry.component not in models:
            continue
        index = 0 if target.rows is None else target.rows[0] // (target.rows[1] - target.rows[0])
        actual = names[entry.component].get(entry.diffusers[index])
        if actual is None:
            raise InputError(f"{target.key}: the {entry.component} has no weight {entry.diffusers[index]}")
        found[target.name] = models[entry.component].get_submodule(actual.removesuffix(".weight"))
    return found


def collect_moments(
    arch: Architecture,
    models: Mapping[str, torch.nn.Module],
    modules: Mapping[str, torch.nn.Module],
    samples: Sequence[tuple[Tensor, str]],
    *,
    timesteps: int,
    seed: int,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """E[x xᵀ] (fp32, on the pass's device) of the inputs of ``modules`` and the tap sums of 3x3 convs
    (:func:`tap_sums`), over ``samples`` (pixels (1, 3, h, w),
    caption), each image at ``timesteps`` noise levels spread over the schedule, noise and timestep order from
    ``seed``."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(arch.scheduler)
    steps = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    total = len(samples) * timesteps
    strata = ((torch.arange(total) + 0.5) * steps / total).long().clamp(0, steps - 1)
    order = strata[torch.randperm(total, generator=gen)].view(len(samples), timesteps)
    unet, vae = models["unet"], models["vae"]
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    with moment_hooks(modules) as sums, torch.no_grad():
        for (pixels, caption), ts in zip(samples, order, strict=True):
            embeds, pooled = encode_prompts(arch, models, [caption])
            latents = vae.encode(pixels.to(device, dtype)).latent_dist.mean * arch.vae["scaling_factor"]
            latents = latents.repeat(timesteps, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=gen).to(device, dtype)
            noisy = scheduler.add_noise(latents, noise, ts.to(device))
            height, width = pixels.shape[-2:]
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
            added = {"text_embeds": pooled.repeat(timesteps, 1), "time_ids": time_ids.repeat(timesteps, 1)}
            unet(noisy, ts.to(device), encoder_hidden_states=embeds.repeat(timesteps, 1, 1), added_cond_kwargs=added)
    return {name: (entry.moment / max(entry.rows, 1), entry.taps) for name, entry in sums.items()}


@dataclass
class InputSums:
    """Running sums over one input: x xᵀ over its rows (a conv's pixels), and a kh x kw conv's tap products."""

    moment: Tensor  # (in, in) fp32
    rows: int = 0
    taps: Tensor | None = None  # (t, t): sum over patches and channels of x_c(tap p) x_c(tap q)


@contextmanager
def moment_hooks(modules: Mapping[str, torch.nn.Module]) -> Iterator[dict[str, InputSums]]:
    """Forward pre-hooks summing each module's input statistics (fp32, on its device); removed on exit."""
    sums: dict[str, InputSums] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x, taps = args[0].float(), None
            if isinstance(module, torch.nn.Conv2d):
                taps = tap_sums(module, x) if math.prod(module.kernel_size) > 1 else None
                x = x.movedim(1, -1)  # each pixel's channels are one input row
            rows = x.reshape(-1, x.shape[-1])
            entry = sums.get(name)
            if entry is None:
                entry = sums[name] = InputSums(rows.new_zeros(rows.shape[1], rows.shape[1]))
            entry.moment.addmm_(rows.mT, rows)
            entry.rows += rows.shape[0]
            if taps is not None:
                entry.taps = taps if entry.taps is None else entry.taps + taps

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def tap_sums(conv: torch.nn.Conv2d, x: Tensor) -> Tensor:
    """Σ over patches and channels of x_c(tap p)·x_c(tap q) (t, t) for the patches ``conv`` reads of x (n, in, h, w),
    one image at a time (an unfolded image is t times its size)."""
    t = math.prod(conv.kernel_size)
    total = x.new_zeros(t, t)
    for image in x:
        patches = F.unfold(image[None], conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                           stride=conv.stride).view(image.shape[0], t, -1)  # fmt: skip
        total += torch.einsum("cpl,cql->pq", patches, patches)
    return total


def compute_calibration(
    base: Path, items: Sequence[Item], data: RunData, *, components: str | None, seed: int, device: torch.device
) -> Calibration:
    """Moments of the base model's LoRA layer inputs over ``items`` (see :func:`collect_moments`), with metadata."""
    arch = resolve_architecture(base, components)
    with open_checkpoint(base) as reader:
        weights = ModelWeights.load(reader, arch, (*MODEL_PARTS, "vae"), device=device, dtype=torch.float32)
        shapes = reader.shapes()
        modules = hooked_modules(weights.models, shapes)
    samples = [(load_pixels(item.image, bucket_size(*item.size, data)), item.caption) for item in items]
    dense = collect_moments(arch, weights.models, modules, samples, timesteps=TIMESTEPS_PER_IMAGE, seed=seed)
    moments = {}
    for group in list(dense):  # each dense moment freed once compressed
        moment, taps = dense.pop(group)
        moments[group] = compress(moment, taps=None if taps is None else tap_moment(taps))
    members = {t.name: moment_group(t.name) for t in calibrated_targets(shapes) if moment_group(t.name) in moments}
    metadata = {
        "base": base.name,
        "base_fingerprint": fingerprint(base),
        "images": str(len(items)),
        "timesteps_per_image": str(TIMESTEPS_PER_IMAGE),
        "seed": str(seed),
        "image_files": json.dumps([item.image.name for item in items]),
    }
    return Calibration(moments, members, metadata)


def calibrate_run(
    run: Path,
    base: Path,
    *,
    images: int = CALIBRATION_IMAGES,
    split: str = "calibration",
    seed: int = 0,
    components: str | None = None,
    device: torch.device | str = "cpu",
    echo: Callable[[str], None] = LOG.info,
) -> Path:
    """RUN/calibration.safetensors for ``base``: computed on up to ``images`` of the ``split`` of the run's images
    (see :data:`xlbake.data.run_images.SPLITS`), or reused when present and computed from this base (InputError when
    it was computed from another base)."""
    path = run / CALIBRATION_NAME
    if path.exists():
        found = read_calibration(path).metadata
        if found.get("base_fingerprint") != fingerprint(base):
            raise InputError(f"{path}: computed from {found.get('base')}, not {base}; delete it to recompute")
        echo(f"calibration: reusing {path} ({summary(found)})")
        return path
    data = read_run(run)
    items = split_items(run_items(data, seed), split)[:images]
    echo(f"calibration: base model over {len(items)} {split} images x {TIMESTEPS_PER_IMAGE} timesteps of {run}")
    result = compute_calibration(base, items, data, components=components, seed=seed, device=torch.device(device))
    write_calibration(replace(result, metadata={**result.metadata, "run": str(run), "split": split}), path)
    return path


def extract_calibration(cfg: ExtractConfig, echo: Callable[[str], None]) -> Calibration | None:
    """The statistics ``extract --calibration FILE`` / ``--calibrate RUN`` asks for (None: plain SVD), their 3x3 conv
    statistics only with ``calibrate_convs``; InputError when they were computed from another base model."""
    calibration, base = cfg.calibration, cfg.base
    if cfg.calibrate is not None:
        calibration = calibrate_run(cfg.calibrate, base, device=resolve_device(cfg.device), echo=echo)
    if calibration is None:
        return None
    found = read_calibration(calibration, convs=cfg.calibrate_convs)
    if found.metadata.get("base_fingerprint") != fingerprint(base):
        raise InputError(f"{calibration}: computed from {found.metadata.get('base')}, not from --base {base}")
    echo(f"calibrated extraction: whitening by {calibration.name} ({summary(found.metadata)})")
    return found


def whitening_for(calibration: Calibration | None, target: LoraTarget) -> Whitening | KronWhitening | None:
    """The whitening factor S (in·kh·kw, in·kh·kw) of ``target``, or None when it is factored plainly (no
    calibration or no statistics for it)."""
    moment = None if calibration is None else moment_for(calibration, target.name)
    if moment is None:
        return None
    if (moment.taps is None) != (target.kind != "conv3x3"):
        raise InputError(f"calibration: {target.name} is a {target.kind}, its statistics are not")
    if moment.size != target.shape[1]:
        raise InputError(f"calibration: {target.name} has {moment.size} inputs, the model {target.shape[1]}")
    return moment_whitening(moment, DAMPING)
