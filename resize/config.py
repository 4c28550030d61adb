"""Settings of the resize stage, validated once at the edge."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xlbake.errors import ConfigError
from xlbake.lora.budget import SizeBudget, parse_size

Method = Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]
Precision = Literal["fp16", "bf16", "fp32"]
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
CONFIG_VERSION = 1

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_EXAMPLE_VALUES = {"sv_ratio": "--value 4", "sv_fro": "--value 0.9", "sv_cumulative": "--value 0.6"}


@dataclass(frozen=True)
class ResizeConfig:
    """``python -m resize``: make smaller LoRAs from one LoRA, exactly, in factor space."""

    lora: Path | None = None
    """The kohya-format LoRA to resize (.safetensors); usually given as --lora."""
    out: Path | None = None
    """Output .safetensors file; usually given as --out. With several ranks or sizes, a {rank} or {size} placeholder
    in the name is filled in, else -r{rank} or -{size} is added before the suffix (lora-r8.safetensors)."""
    rank: tuple[int, ...] = ()
    """Rank of Linear and 1x1 conv modules, one output file per value. With a dynamic method or a size budget it is
    the per-layer cap instead (one value; default: no cap). A layer whose rank is already lower is kept as is."""
    conv_rank: int | None = None
    """Rank (or cap) of 3x3 conv (LoCon) modules; default: the same as rank."""
    method: Method = "fixed"
    """fixed: exactly `rank` per layer. sv_ratio, sv_fro, sv_cumulative: per layer the smallest rank that meets
    `value` (kohya's criteria, without kohya's extra singular value), capped by `rank`."""
    value: float | None = None
    """Criterion of a dynamic method. sv_ratio: keep singular values >= largest / value (value >= 1). sv_fro: keep
    this fraction of the Frobenius norm (0 < value <= 1). sv_cumulative: keep this fraction of the sum of singular
    values (0 < value <= 1)."""
    size: tuple[str, ...] = ()
    """Global budgets, one output file each: a file size ("50MB", "1.5GB", "800KiB"; KB/MB/GB are powers of 1000)
    or a parameter count ("20M", "20M params"). Ranks are allocated across layers for the most kept energy."""
    alpha: float | None = None
    """The one alpha written for every module (each layer's scale is folded into its factors); default: the
    largest written rank."""
    save_precision: Precision = "fp16"
    """Precision of the written factors (the math runs in fp32)."""
    device: str = "cpu"
    """Where the small QR/SVD run: cpu, cuda, cuda:N or mps."""
    calibration: Path | None = None
    """Input statistics (a ``calibration.safetensors`` from ``extract --calibrate``): resize each Linear / 1x1 layer
    to keep the most of its effect on its real inputs rather than the most weight energy, as calibrated extraction
    does; layers without statistics are resized plainly."""
    calibrate_convs: bool = False
    """With calibration, also resize the 3x3 convs in their whitened metric (as extract's calibrate_convs)."""
    report: bool = True
    """Write <out stem>.report.json and .report.png (kept energy per layer and component) beside each output."""
    config_version: int = CONFIG_VERSION
    """Version of this config layout."""

    def __post_init__(self) -> None:
        problems = []
        if any(rank < 1 for rank in self.rank) or (self.conv_rank is not None and self.conv_rank < 1):
            shown = [*self.rank, *([] if self.conv_rank is None else [self.conv_rank])]
            problems.append(f"rank/conv_rank: got {shown}; ranks must be positive integers, e.g. --rank 16")
        if len(set(self.rank)) != len(self.rank):
            problems.append(f"rank: {list(self.rank)} repeats a value; give each rank once")
        problems += self._method_problems()
        problems += self._size_problems()
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"alpha: got {self.alpha}; must be a positive number (or null for the largest rank)")
        if not _DEVICE.match(self.device):
            problems.append(f"device: got {self.device!r}; expected cpu, cuda, cuda:N or mps")
        if problems:
            raise ConfigError("; ".join(problems))

    def _method_problems(self) -> list[str]:
        if self.method == "fixed":
            if self.value is not None:
                return [f"value: {self.value} is only used by sv_ratio/sv_fro/sv_cumulative; drop it or pick a method"]
            if not self.rank and not self.size:
                return ["rank: missing; give --rank (e.g. --rank 16 or --rank 8,16,32) or a --size budget"]
            return []
        problems = []
        if self.value is None:
            problems.append(f"value: method {self.method} needs --value (e.g. {_EXAMPLE_VALUES[self.method]})")
        elif self.method == "sv_ratio" and not self.value >= 1:
            problems.append(f"value: sv_ratio needs a ratio >= 1, got {self.value}")
        elif self.method != "sv_ratio" and not 0 < self.value <= 1:
            problems.append(f"value: {self.method} needs a fraction in (0, 1], got {self.value}")
        if len(self.rank) > 1:
            problems.append(f"rank: method {self.method} takes one rank cap, got {list(self.rank)}")
        return problems

    def _size_problems(self) -> list[str]:
        if not self.size:
            return []
        problems = []
        for text in self.size:
            try:
                parse_size(text)
            except ValueError as exc:
                problems.append(f"size: {exc}")
        if self.method != "fixed":
            problems.append(f"size: a size budget and method {self.method} exclude each other; pick one")
        if len(self.rank) > 1:
            problems.append(f"rank: with a size budget rank is one per-layer cap, got {list(self.rank)}")
        if len(set(self.size)) != len(self.size):
            problems.append(f"size: {list(self.size)} repeats a value; give each size once")
        return problems

    @property
    def budgets(self) -> tuple[SizeBudget, ...]:
        return tuple(parse_size(text) for text in self.size)
