"""Which files one resize call writes, and what decides each one's ranks."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from resize.config import ResizeConfig
from xlbake.errors import ConfigError
from xlbake.lora.budget import SizeBudget

SUFFIX = ".safetensors"
_PLACEHOLDER = re.compile(r"\{(rank|size)\}")


@dataclass(frozen=True)
class OutputPlan:
    """One output file and what decides its ranks."""

    path: Path
    rank: int | None  # Linear/1x1 rank (fixed) or per-layer cap (dynamic, budget); None: no cap
    conv_rank: int | None  # the same for 3x3 convs
    budget: SizeBudget | None  # global size budget, or None

    def cap(self, kind: str) -> int | None:
        return self.conv_rank if kind == "conv3x3" else self.rank


def plan_outputs(cfg: ResizeConfig) -> list[OutputPlan]:
    """One plan per rank (or per size budget), with output names filled in; refuse clashing or missing paths."""
    if cfg.lora is None:
        raise ConfigError("lora: no input LoRA given; pass --lora IN.safetensors")
    if cfg.out is None:
        raise ConfigError("out: no output file given; pass --out OUT.safetensors")
    if cfg.out.suffix != SUFFIX:
        raise ConfigError(f"out: {cfg.out} must be a {SUFFIX} file")
    conv = cfg.conv_rank
    if cfg.size:
        cap = cfg.rank[0] if cfg.rank else None
        many = len(cfg.budgets) > 1
        plans = [
            OutputPlan(_output_path(cfg.out, "size", b.label, many), cap, conv if conv is not None else cap, b)
            for b in cfg.budgets
        ]
    else:
        ranks: Sequence[int | None] = cfg.rank or (None,)
        many = len(ranks) > 1
        plans = [
            OutputPlan(
                _output_path(cfg.out, "rank", _rank_label(cfg, r), many), r, conv if conv is not None else r, None
            )
            for r in ranks
        ]
    paths = [plan.path.resolve() for plan in plans]
    if cfg.lora.resolve() in paths:
        raise ConfigError(f"out: {cfg.lora} is the input; write the resized LoRA to another file")
    if len(set(paths)) != len(paths):
        raise ConfigError(f"out: {cfg.out} gives the same file name to several outputs; add a {{rank}} or {{size}}")
    return plans


def keep_for(plans: Sequence[OutputPlan]) -> Callable[[str], int | None]:
    """How many singular triplets of a layer of a given kind any output may need (None: all of them)."""

    def keep(kind: str) -> int | None:
        caps = [plan.cap(kind) for plan in plans]
        return None if any(cap is None for cap in caps) else max(caps)

    return keep


def _rank_label(cfg: ResizeConfig, rank: int | None) -> str:
    return str(rank) if rank is not None else f"{cfg.method}{cfg.value:g}"


def _output_path(out: Path, key: str, label: str, many: bool) -> Path:
    """``out`` with its {rank}/{size} placeholder filled in, or with -r{rank}/-{size} added when several outputs."""
    name = out.name
    if f"{{{key}}}" in name:
        name = name.replace(f"{{{key}}}", label)
    elif many:
        name = f"{out.stem}-{'r' if key == 'rank' else ''}{label}{out.suffix}"
    leftover = _PLACEHOLDER.search(name)
    if leftover:
        other = "--size" if leftover.group(1) == "size" else "--rank"
        raise ConfigError(f"out: {out.name} has a {leftover.group(0)} placeholder, which needs {other}")
    return out.with_name(name)


def target_text(cfg: ResizeConfig, plan: OutputPlan) -> str:
    """What an output asks for, in words: "rank 16", "size 50MB (cap rank 64)", "sv_fro 0.9 (cap rank 32)"."""
    caps = (
        ""
        if plan.rank is None
        else f"rank {plan.rank}" + ("" if plan.conv_rank == plan.rank else f", conv rank {plan.conv_rank}")
    )
    if plan.budget is not None:
        return f"size {plan.budget.text}" + (f" (cap {caps})" if caps else "")
    if cfg.method == "fixed":
        return caps
    return f"{cfg.method} {cfg.value:g}" + (f" (cap {caps})" if caps else "")
