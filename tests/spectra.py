"""Test matrices of known spectrum for the SVD tests (tests/lora): exact spectra, power laws, and the benchmark's
slow-decay difference, all built in fp64 from seeded generators."""

import torch

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=F64)).Q


def with_spectrum(rows: int, cols: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) matrix whose singular values are exactly `s` (len(s) <= min(rows, cols)), fp64."""
    g = gen(seed)
    return (orthonormal(rows, len(s), g) * s) @ orthonormal(cols, len(s), g).T


def power_law(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    """A rank-`rank` matrix with sigma_i ~ (i + 1)^-0.5 and unit Frobenius norm, fp64."""
    part = with_spectrum(rows, cols, torch.arange(1, rank + 1, dtype=F64) ** -0.5, seed)
    return part / part.norm()


def slow_decay(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The benchmark's hard case: a power-law rank-60 part plus dense Gaussian noise of equal energy, rounded
    through fp16 like a stored difference (the spectrum decays slowly past any kept rank), as `dtype`."""
    noise = torch.randn(rows, cols, generator=gen(seed + 100), dtype=F64)
    return (power_law(rows, cols, 60, seed) + noise / noise.norm()).half().to(dtype)


def nearly_low_rank(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """A rank-`rank` power law plus dense noise of `noise` times its norm, fp32 (a merged LoRA stored in fp32)."""
    dense = torch.randn(rows, cols, generator=gen(seed + 100), dtype=F64)
    return (power_law(rows, cols, rank, seed) + noise * dense / dense.norm()).float()
