"""What a run reports while it trains: the progress bar (with the share of time spent waiting for data), and the
trackers (tensorboard, wandb) with the run's hyperparameters and each step's loss and learning rates."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tqdm.auto import tqdm

from finetune.config import FinetuneConfig, LogConfig
from xlbake.config import to_dict
from xlbake.config_values import flatten
from xlbake.errors import ConfigError


class DataTimer:
    """Share of wall time spent waiting for the next batch."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.start = time.perf_counter()

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - began
            yield batch

    def share(self) -> float:
        return self.waiting / max(time.perf_counter() - self.start, 1e-9)


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """Flat scalar hyperparameters for the trackers (tensorboard's hparams take no lists or None)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in flatten(config).items()
        if not (isinstance(v, float) and math.isnan(v))
    }


def trackers(log: LogConfig) -> list[str] | None:
    """accelerate's ``log_with`` for ``log`` (None: no tracker); ConfigError when wandb is not installed."""
    if log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb: the wandb package is not installed; pip install wandb, or set log.wandb false")
    return [name for name, on in (("tensorboard", log.tensorboard), ("wandb", log.wandb)) if on] or None


def start_trackers(accelerator: Any, cfg: FinetuneConfig) -> None:
    """Start the configured trackers with the run's hyperparameters."""
    if cfg.log.tensorboard or cfg.log.wandb:
        accelerator.init_trackers("finetune", config=tracker_config(to_dict(cfg)))


def progress_bar(total: int, initial: int, show: bool) -> tqdm:
    """The bar of optimizer steps (hidden unless ``show``)."""
    return tqdm(total=total, initial=initial, unit="step", disable=not show)


def report_step(
    accelerator: Any, log: LogConfig, bar: tqdm, timer: DataTimer, step: int, epoch: int, loss: float, lrs: Mapping
) -> None:
    """Log optimizer step ``step``'s loss and LRs (every log.every_steps) and show them on the bar."""
    if step % log.every_steps == 0:
        accelerator.log({"loss": loss, **{f"lr/{k}": v for k, v in lrs.items()}}, step=step)
    bar.update(1)
    lr = next(iter(lrs.values()))
    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", lr=f"{lr:.2e}", data=f"{timer.share():.0%}")
