"""Sample images during training with the diffusers SDXL pipeline built from the in-memory components."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from finetune.config import SampleConfig
from xlbake.fileio import write_bytes_atomic
from xlbake.prompts import PromptDefaults, resolve_lines


def render_samples(
    components: Mapping[str, object],
    cfg: SampleConfig,
    out_dir: Path,
    tag: str,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> list[Path]:
    """Render every prompt of ``cfg`` with a fixed seed into ``out_dir/{tag}-{i:02d}.png``; return the files.

    A prompt's own kohya options (``--n --w --h --s --l --d``, see :mod:`xlbake.prompts`) override ``cfg``'s
    settings; prompt i's seed is ``cfg.seed + i`` unless it sets ``--d``.

    ``components``: StableDiffusionXLPipeline keyword arguments (unet, text_encoder, text_encoder_2, vae,
    tokenizer, tokenizer_2, scheduler), all on one device. Modules are switched to eval mode and back; no gradient
    is kept. The text encoders and the UNet run under ``autocast`` (the training's mixed precision), the VAE
    outside it (``decode_latents``).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts = dict(components)
    parts["scheduler"] = EulerDiscreteScheduler.from_config(parts["scheduler"].config)
    modules = [m for m in parts.values() if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    written = []
    try:
        for module in modules:
            module.eval()
        defaults = PromptDefaults(cfg.negative_prompt, cfg.width, cfg.height, cfg.steps, cfg.guidance_scale, cfg.seed)
        for index, options in enumerate(resolve_lines(cfg.prompts, defaults)):
            generator = torch.Generator().manual_seed(options.seed)
            with torch.no_grad():
                with autocast():
                    latents = pipe(
                        options.prompt,
                        negative_prompt=options.negative_prompt or None,
                        num_inference_steps=options.steps,
                        guidance_scale=options.guidance_scale,
                        width=options.width,
                        height=options.height,
                        generator=generator,
                        output_type="latent",
                    ).images
                image = pipe.image_processor.postprocess(decode_latents(pipe.vae, latents), output_type="pil")[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            written.append(write_bytes_atomic(out_dir / f"{tag}-{index:02d}.png", buffer.getvalue(), force=True))
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    return written


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1], decoded in the VAE's own dtype, autocast off.

    Under fp16 autocast the SDXL VAE overflows (black or NaN images) although its weights are fp32: diffusers
    upcasts only a VAE whose weights are fp16. An fp16-fixed VAE (precision.vae: fp16) decodes in fp16 as made for.
    """
    param = next(vae.parameters())
    config = vae.config
    latents = latents.to(param.device, param.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (config.latents_mean, config.latents_std))
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.autocast(param.device.type, enabled=False):
        return vae.decode(latents).sample


@contextlib.contextmanager
def moved_to(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Inside: ``modules`` on ``device``; after: each back on the device it was on (EMA copies kept on the CPU)."""
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            module.to(home)
