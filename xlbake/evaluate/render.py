"""Rendering a sample grid: defaults fit for the device, the images of every column, and progress (a bar over every
denoising step on a terminal, one log line per image otherwise) with an estimate of the whole grid's time from its
first measured step, logged before the rest renders."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from xlbake.errors import InputError
from xlbake.evaluate.grid import ADAPTER, GridColumn, SampleSettings, load_lora, load_pipeline
from xlbake.prompts import PromptDefaults, SampleOptions, resolve_lines

logger = logging.getLogger(__name__)

GPU_DEFAULTS = (30, 1024, 1024)
"""steps, width, height of a grid on a GPU: SDXL's native size."""
CPU_DEFAULTS = (20, 512, 512)
"""steps, width, height of a grid on the CPU, where 1024^2 x 30 steps takes ~14 min a column of 4 images."""


def sample_defaults(
    device: torch.device, *, steps: int | None, width: int | None, height: int | None
) -> tuple[int, int, int, str | None]:
    """(steps, width, height, note): the given values, the unset ones from ``CPU_DEFAULTS`` on the CPU (with a note
    saying so) or ``GPU_DEFAULTS`` elsewhere."""
    cpu = device.type == "cpu"
    given = (steps, width, height)
    chosen = tuple(d if g is None else g for g, d in zip(given, CPU_DEFAULTS if cpu else GPU_DEFAULTS, strict=True))
    note = None
    if cpu and None in given:
        note = (
            f"on the CPU: {chosen[0]} steps at {chosen[1]}x{chosen[2]} (GPU defaults: {GPU_DEFAULTS[0]} steps at "
            f"{GPU_DEFAULTS[1]}x{GPU_DEFAULTS[2]}); set --steps, --width and --height to choose"
        )
    return (*chosen, note)


def render_images(
    pipe: Any, prompts: Sequence[str], settings: SampleSettings, progress: GridProgress | None = None
) -> list[Image.Image]:
    """One image per prompt line; row i uses a generator seeded ``settings.seed + i`` (same in every column).

    A line's kohya options (``--n --w --h --s --l --d``, :mod:`xlbake.prompts`) override ``settings`` for its row;
    consecutive rows with the same settings are rendered together, ``settings.batch_size`` at a time.
    """
    rows = row_options(prompts, settings)
    images: list[Image.Image] = []
    start = 0
    while start < len(rows):
        end = start + 1
        while end < min(len(rows), start + settings.batch_size) and _same_call(rows[end], rows[start]):
            end += 1
        chunk, first = rows[start:end], rows[start]
        if progress is not None:
            progress.start_call()
        with torch.no_grad():
            images += pipe(
                prompt=[row.prompt for row in chunk],
                negative_prompt=[row.negative_prompt for row in chunk] if first.negative_prompt else None,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=[torch.Generator(pipe.device).manual_seed(row.seed) for row in chunk],
                callback_on_step_end=progress.on_step_end if progress is not None else None,
            ).images
        if progress is not None:
            progress.images_done([f"prompt {start + i + 1}: {row.prompt[:60]}" for i, row in enumerate(chunk)])
        start = end
    return images


def row_options(prompts: Sequence[str], settings: SampleSettings) -> list[SampleOptions]:
    """Every row's prompt and settings; InputError for a bad option or rows of different sizes (one sheet)."""
    s = settings
    defaults = PromptDefaults(s.negative_prompt, s.width, s.height, s.steps, s.guidance_scale, s.seed)
    rows = resolve_lines(prompts, defaults)
    for line, row in zip(prompts, rows, strict=True):
        if (row.width, row.height) != (rows[0].width, rows[0].height):
            raise InputError(
                f"prompt {line.strip()!r} is {row.width}x{row.height}, {prompts[0].strip()!r} {rows[0].width}x"
                f"{rows[0].height}: a grid's rows share one size; set it with --width/--height"
            )
    return rows


def _same_call(a: SampleOptions, b: SampleOptions) -> bool:
    """Whether two rows can be rendered in one pipeline call (all but prompt and seed equal)."""
    return replace(a, prompt="", seed=0) == replace(b, prompt="", seed=0)


def render_grid(
    columns: Sequence[GridColumn],
    prompts: Sequence[str],
    settings: SampleSettings,
    *,
    components: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[list[Image.Image]]:
    """Images[row = prompt][column]; each model is loaded once and each LoRA once per model. Progress per step
    (a bar on a terminal, else a log line per image) and a time estimate from the first step."""
    if not prompts or not columns:
        raise ValueError("render_grid: need at least one prompt and one column")
    row_options(prompts, settings)  # bad options and mixed sizes stop before any model loads
    cells: list[list[Any]] = [[None] * len(columns) for _ in prompts]
    calls = len(columns) * -(-len(prompts) // settings.batch_size)
    progress = GridProgress(steps=settings.steps, calls=calls, images=len(columns) * len(prompts))
    for model in dict.fromkeys(c.model for c in columns):
        pipe = load_pipeline(model, components=components, device=device, dtype=dtype)
        for lora in dict.fromkeys(c.lora for c in columns if c.model == model):
            if lora is not None:
                load_lora(pipe, lora)
            for index, column in enumerate(columns):
                if column.model != model or column.lora != lora:
                    continue
                if lora is not None:
                    pipe.set_adapters([ADAPTER], adapter_weights=[column.weight])
                logger.info("grid column %d/%d: %s %s x %g", index + 1, len(columns), model, lora or "", column.weight)
                for row, image in enumerate(render_images(pipe, prompts, settings, progress)):
                    cells[row][index] = image
            if lora is not None:
                pipe.unload_lora_weights()
        del pipe
    progress.close()
    return cells


class GridProgress:
    """Counts the denoising steps of ``calls`` pipeline calls of ``steps`` steps each, making ``images`` images."""

    def __init__(self, *, steps: int, calls: int, images: int) -> None:
        self.steps, self.calls, self.images = steps, calls, images
        self.done = 0
        self.bar = tqdm(total=steps * calls, desc="grid", unit="step", disable=None, leave=False)  # off unless a tty
        self._started: float | None = None
        self._estimated = False

    def start_call(self) -> None:
        """Before a pipeline call: its first step's time includes encoding its prompts, as every call's does."""
        self._started = time.perf_counter()

    def on_step_end(self, _pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end``: advance the bar; after the very first step, log the estimate."""
        self.bar.update(1)
        if not self._estimated and self._started is not None:
            self._estimated = True
            first = time.perf_counter() - self._started
            total = first * self.steps * self.calls
            logger.info(
                "estimated %s for %d images: first step %.2f s x %d steps x %d pipeline calls (model loading not "
                "counted)",
                _duration(total),
                self.images,
                first,
                self.steps,
                self.calls,
            )
        return callback_kwargs

    def images_done(self, labels: list[str]) -> None:
        """After a pipeline call: one log line per image when there is no bar."""
        for label in labels:
            self.done += 1
            if self.bar.disable:
                logger.info("image %d/%d: %s", self.done, self.images, label)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
