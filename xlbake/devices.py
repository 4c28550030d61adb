"""The one device-name resolver of the stages and tools: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from xlbake.errors import ConfigError

if TYPE_CHECKING:
    import torch


HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> None:
    """Ask torch to put CPU tensors of 2 MB and more on transparent huge pages: its ``THP_MEM_ALLOC_ENABLE``, read
    at its first allocation, so call this before torch is imported. A value the user set wins.

    Extract and resize write every layer's buffers fresh: on 4 KB pages their page faults cost 1.7 ns per fp32
    element on the (virtual) machine this was measured on, 8x a second write, and 3x less on huge pages; extract
    then took ~8 % less CPU. Linux honours it when /sys/kernel/mm/transparent_hugepage/enabled is ``always`` or
    ``madvise`` (most distributions' default); elsewhere it changes nothing.
    """
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; ``auto`` is the first CUDA GPU when torch sees one, else the CPU. ConfigError for a
    device this machine does not have (torch is imported here, so config checks stay fast)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device: {name} is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name} is not available on this machine; use --device cpu")
    return device
