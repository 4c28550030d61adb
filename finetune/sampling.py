"""Sample images during training with the diffusers SDXL pipeline built from the in-memory components."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch

from finetune.config import SampleConfig
from xlbake.fileio import write_bytes_atomic


def render_samples(components: Mapping[str, object], cfg: SampleConfig, out_dir: Path, tag: str) -> list[Path]:
    """Render every prompt of ``cfg`` with a fixed seed into ``out_dir/{tag}-{i:02d}.png``; return the files.

    ``components``: StableDiffusionXLPipeline keyword arguments (unet, text_encoder, text_encoder_2, vae,
    tokenizer, tokenizer_2, scheduler). Modules are switched to eval mode and back; no gradient is kept.
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
        for index, prompt in enumerate(cfg.prompts):
            generator = torch.Generator().manual_seed(cfg.seed + index)
            with torch.no_grad():
                image = pipe(
                    prompt,
                    negative_prompt=cfg.negative_prompt or None,
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    width=cfg.width,
                    height=cfg.height,
                    generator=generator,
                ).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            written.append(write_bytes_atomic(out_dir / f"{tag}-{index:02d}.png", buffer.getvalue(), force=True))
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    return written
