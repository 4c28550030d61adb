"""Sample images during training with the diffusers SDXL pipeline built from the in-memory components."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch

from finetune.config import SampleConfig
from xlbake.fileio import write_bytes_atomic
from xlbake.prompts import PromptDefaults, resolve_lines


def render_samples(components: Mapping[str, object], cfg: SampleConfig, out_dir: Path, tag: str) -> list[Path]:
    """Render every prompt of ``cfg`` with a fixed seed into ``out_dir/{tag}-{i:02d}.png``; return the files.

    A prompt's own kohya options (``--n --w --h --s --l --d``, see :mod:`xlbake.prompts`) override ``cfg``'s
    settings; prompt i's seed is ``cfg.seed + i`` unless it sets ``--d``.

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
        defaults = PromptDefaults(cfg.negative_prompt, cfg.width, cfg.height, cfg.steps, cfg.guidance_scale, cfg.seed)
        for index, options in enumerate(resolve_lines(cfg.prompts, defaults)):
            generator = torch.Generator().manual_seed(options.seed)
            with torch.no_grad():
                image = pipe(
                    options.prompt,
                    negative_prompt=options.negative_prompt or None,
                    num_inference_steps=options.steps,
                    guidance_scale=options.guidance_scale,
                    width=options.width,
                    height=options.height,
                    generator=generator,
                ).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            written.append(write_bytes_atomic(out_dir / f"{tag}-{index:02d}.png", buffer.getvalue(), force=True))
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    return written
