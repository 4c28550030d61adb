"""Progress of a sample grid: a bar over every denoising step on a terminal (one log line per image otherwise), and
an estimate of the whole grid's time from its first measured step, logged before the rest renders."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)


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
