"""How far an EMA can move in a run: a decay too close to 1 for the step count leaves the saved EMA weights mostly
where averaging started (the base), which no error would reveal. Mirrors ema-pytorch's ``EMA.update`` schedule."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import EmaConfig

MAX_START_SHARE = 0.10
"""Above this share of the starting weights left in the EMA at the end of a run, it is warned about."""


@dataclass(frozen=True)
class EmaReach:
    """What an EMA keeps after a run of ``steps`` optimizer steps."""

    steps: int
    averaging_steps: float  # 1 / (1 - beta): the effective averaging length, in optimizer steps
    start_step: int  # the optimizer step whose weights the averaging starts from (1: the base after one step)
    start_share: float  # their weight in the final EMA


def ema_reach(cfg: EmaConfig, steps: int) -> EmaReach:
    """The EMA after ``steps`` optimizer steps, update for update as ema-pytorch does it (one update per optimizer
    step): the first copies the weights; each later one on a multiple of ``update_every`` copies up to
    ``update_after_step`` and averages after it, with decay ``beta`` (with ``warmup``: 1 - (1 + n / inv_gamma) **
    -power, capped at beta)."""
    share, start = 1.0, 1
    for count in range(1, steps):  # ema-pytorch's counter before the update of optimizer step count + 1
        if count % cfg.update_every:
            continue
        if count <= cfg.update_after_step:
            share, start = 1.0, count + 1  # a copy: averaging starts again from these weights
            continue
        n = count - cfg.update_after_step
        share *= min(cfg.beta, 1 - (1 + n / cfg.inv_gamma) ** -cfg.power) if cfg.warmup else cfg.beta
    return EmaReach(steps, 1 / (1 - cfg.beta), start, share)


def ema_warning(cfg: EmaConfig, steps: int) -> str | None:
    """A warning when the EMA of a ``steps``-step run still holds more than MAX_START_SHARE of the weights it starts
    averaging from (None when it moves enough, or EMA is off)."""
    if not cfg.enabled or steps <= 0:
        return None
    reach = ema_reach(cfg, steps)
    if reach.start_share <= MAX_START_SHARE:
        return None
    start = "the base after one step" if reach.start_step == 1 else f"the weights of step {reach.start_step}"
    return (
        f"ema.beta {cfg.beta:g} averages over ~{reach.averaging_steps:,.0f} optimizer steps (1 / (1 - beta)), but the "
        f"run has {steps:,}: the EMA weights (saved with checkpoint.weights ema/both) will still be "
        f"{reach.start_share:.0%} {start}; lower ema.beta (or ema.update_after_step) or train longer, for at most "
        f"{MAX_START_SHARE:.0%}"
    )
