"""Pure low-rank math shared by extract and resize: reshapes, truncated SVDs, rank selection and allocation.

Every function is a function of tensors: no paths, devices, logging or config objects. Results stay on the
input's device and in its dtype (the caller casts to fp32/fp64 first; LAPACK has no fp16/bf16 SVD or QR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from xlbake.errors import ConfigError, InputError

RANK_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
# Slack on the cumulative criteria so that a fraction met exactly in real arithmetic is not missed by fp64 rounding.
_FRACTION_TOL = 1e-10


@dataclass(frozen=True)
class Svd:
    """A (truncated) SVD: m ≈ u @ diag(s) @ vh."""

    u: Tensor  # (m, k), orthonormal columns
    s: Tensor  # (k,), descending, >= 0
    vh: Tensor  # (k, n), orthonormal rows


def to_matrix(w: Tensor) -> Tensor:
    """A weight or LoRA factor as a matrix: (out, in, kh, kw) -> (out, in*kh*kw); a 2-D tensor is returned as is.

    The same reshape turns LoCon factors into matrices: down (r, in, kh, kw) -> (r, in*kh*kw), up (out, r, 1, 1)
    -> (out, r). It is a view when `w` is contiguous.
    """
    if w.dim() == 2:
        return w
    if w.dim() == 4:
        return w.reshape(w.shape[0], -1)
    raise InputError(f"expected a 2-D (linear) or 4-D (conv) tensor, got shape {tuple(w.shape)}")


def from_matrix(m: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of `to_matrix`: (out, in*kh*kw) -> `shape` = (out, in, kh, kw); a 2-D `shape` is returned as is."""
    return m.reshape(tuple(shape))


def reshape_factors(up: Tensor, down: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Matrix factors (out, r) and (r, in*kh*kw) in the LoRA layout of a weight of `shape`.

    Linear (out, in): up (out, r), down (r, in). Conv (out, in, kh, kw) (LoCon, also 1x1): up (out, r, 1, 1),
    down (r, in, kh, kw), so that conv(x, down) followed by the 1x1 conv `up` equals conv(x, weight).
    """
    if len(shape) == 2:
        return up, down
    if len(shape) != 4:
        raise InputError(f"expected a 2-D (linear) or 4-D (conv) weight shape, got {tuple(shape)}")
    out_ch, in_ch, kh, kw = shape
    rank = down.shape[0]
    return up.reshape(out_ch, rank, 1, 1), down.reshape(rank, in_ch, kh, kw)


def _check_matrix(m: Tensor) -> None:
    if m.dim() != 2:
        raise InputError(f"expected a matrix, got shape {tuple(m.shape)}; reshape conv kernels with to_matrix")


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")


def svd_exact(m: Tensor, rank: int) -> Svd:
    """The top-`rank` singular triplets of m (rows, cols), at most min(rows, cols) of them, in m's dtype.

    Uses the thin `torch.linalg.svd` (never full_matrices). A wide matrix is decomposed through its transpose
    (a view): LAPACK's divide-and-conquer SVD is markedly faster on tall inputs. No Gram-matrix/eigh shortcut,
    which would square the condition number and lose the small singular values.
    Returns u (rows, k), s (k,), vh (k, cols) with k = min(rank, rows, cols).
    """
    _check_matrix(m)
    _check_rank(rank)
    if m.shape[0] < m.shape[1]:
        u, s, vh = torch.linalg.svd(m.mT, full_matrices=False)
        u, vh = vh.mT, u.mT
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return Svd(u=u[:, :rank], s=s[:rank], vh=vh[:rank])


def svd_randomized(m: Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Svd:
    """Approximate top-`rank` SVD of m (rows, cols) by a randomized range finder (Halko, Martinsson & Tropp 2011).

    Sketches the range with a Gaussian test matrix of `rank + oversample` columns drawn from a generator seeded
    with `seed` on m's device (same inputs, device and seed -> same result), runs `power_iters` subspace
    iterations re-orthonormalized by QR after every product (keeps the small singular directions from being
    washed out in floating point), then takes the exact SVD of the small projected matrix.
    Falls back to `svd_exact` when the sketch would not be smaller than the matrix.
    Returns u (rows, k), s (k,), vh (k, cols) with k = min(rank, rows, cols).
    """
    _check_matrix(m)
    _check_rank(rank)
    if oversample < 0 or power_iters < 0:
        raise ConfigError(f"oversample and power_iters must be >= 0, got {oversample} and {power_iters}")
    width = rank + oversample
    if width >= min(m.shape):
        return svd_exact(m, rank)
    generator = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(m.shape[1], width, generator=generator, device=m.device, dtype=m.dtype)
    q = torch.linalg.qr(m @ omega).Q  # (rows, width)
    for _ in range(power_iters):
        z = torch.linalg.qr(m.mT @ q).Q  # (cols, width)
        q = torch.linalg.qr(m @ z).Q
    small = svd_exact(q.mT @ m, rank)  # (width, cols) -> triplets of the projection
    return Svd(u=q @ small.u, s=small.s, vh=small.vh)


def split_factors(svd: Svd, rank: int) -> tuple[Tensor, Tensor]:
    """LoRA factors of the top-`rank` triplets with the singular values split evenly between them.

    up (m, r) = u * sqrt(s), down (r, n) = sqrt(s) * vh, r = min(rank, k); up @ down is the rank-r truncation.
    """
    _check_rank(rank)
    root = svd.s[:rank].sqrt()
    return svd.u[:, :rank] * root, root[:, None] * svd.vh[:rank]


def _fraction_rank(cumulative: Tensor, target: float) -> int:
    """Smallest r with cumulative[r - 1] / cumulative[-1] >= target (up to fp64 rounding)."""
    fractions = cumulative / cumulative[-1]
    return int(torch.searchsorted(fractions, torch.tensor([target - _FRACTION_TOL], dtype=fractions.dtype))) + 1


def select_rank(s: Tensor, method: str, value: float, max_rank: int) -> int:
    """The rank to keep for a layer with descending singular values `s`: the MINIMAL rank meeting the criterion.

    - "fixed": max_rank (`value` is not used).
    - "sv_ratio": keep every σ_i with σ_i > σ_max / value (kohya's test), i.e. the smallest r such that every
      discarded σ_i satisfies σ_max / σ_i >= value. Needs value >= 1.
    - "sv_fro": smallest r with sqrt(Σ_{i<r} σ_i² / Σ σ_i²) >= value: the kept fraction of the Frobenius norm
      (not of the energy). Needs 0 < value <= 1.
    - "sv_cumulative": smallest r with Σ_{i<r} σ_i / Σ σ_i >= value. Needs 0 < value <= 1.
    The result is capped at min(max_rank, len(s)) and is at least 1; a zero spectrum gives 1 for the dynamic
    methods (every rank meets them). Examples: S=[10,1,1,1], sv_ratio 5 -> 1; S=[10,5,1,0.5,0.1]: sv_ratio 4 -> 2,
    sv_fro 0.9 -> 2, sv_cumulative 0.6 -> 1.
    """
    if method not in RANK_METHODS:
        raise ConfigError(f"unknown rank method {method!r}: use one of {', '.join(RANK_METHODS)}")
    if max_rank < 1:
        raise ConfigError(f"max rank must be >= 1, got {max_rank}")
    if method == "sv_ratio" and not value >= 1:
        raise ConfigError(f"sv_ratio must be >= 1 (largest/smallest kept singular value), got {value}")
    if method in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        raise ConfigError(f"{method} must be a fraction in (0, 1], got {value}")
    if s.dim() != 1 or s.numel() == 0:
        raise InputError(f"expected a non-empty 1-D spectrum, got shape {tuple(s.shape)}")
    cap = min(max_rank, s.numel())
    s64 = s.detach().to(device="cpu", dtype=torch.float64)
    if method == "fixed":
        return cap
    if not s64[0] > 0:
        return 1
    if method == "sv_ratio":
        rank = int((s64 > s64[0] / value).sum())
    elif method == "sv_fro":
        rank = _fraction_rank(torch.cumsum(s64**2, 0), value**2)
    else:
        rank = _fraction_rank(torch.cumsum(s64, 0), value)
    return max(1, min(rank, cap))


def _fill_budget(costs: Tensor, budget: int) -> Tensor:
    """Take items in the given order while they fit, skipping any that no longer fit; a mask over `costs`.

    Vectorized: each round takes the longest fitting prefix of the remaining candidates, then drops every
    candidate dearer than what is left. The item that stopped a round is dropped with its cost class, so the
    number of rounds is at most the number of distinct costs.
    """
    taken = torch.zeros(costs.numel(), dtype=torch.bool)
    candidates = torch.arange(costs.numel())
    remaining = budget
    while candidates.numel():
        spent = torch.cumsum(costs[candidates], 0)
        count = int(torch.searchsorted(spent, torch.tensor([remaining]), right=True))
        taken[candidates[:count]] = True
        if count:
            remaining -= int(spent[count - 1])
        rest = candidates[count:]
        candidates = rest[costs[rest] <= remaining]
    return taken


def _best_uniform(energies: Sequence[Tensor], costs: Tensor, budget: int) -> tuple[list[int], float]:
    """The largest single rank r (each layer min(r, its cap)) that fits the budget, and the energy it keeps."""
    caps = torch.tensor([e.numel() for e in energies], dtype=torch.int64)

    def cost_of(rank: int) -> int:
        return int((torch.clamp(caps, max=rank) * costs).sum())

    low, high = 0, int(caps.max()) if caps.numel() else 0
    while low < high:  # cost_of is non-decreasing in the rank: binary search for the largest that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost_of(mid) <= budget else (low, mid - 1)
    ranks = [min(low, e.numel()) for e in energies]
    return ranks, float(sum(float(e[:r].sum()) for e, r in zip(energies, ranks, strict=True)))


def allocate_ranks(
    spectra: Sequence[Tensor], cost_per_rank: Sequence[int], budget: int, max_ranks: Sequence[int]
) -> list[int]:
    """Per-layer ranks keeping the most total energy Σ_i Σ_{j<rank_i} σ_ij² within a parameter budget.

    spectra[i]: layer i's singular values, descending (k_i,). cost_per_rank[i]: parameters one unit of rank
    costs in layer i (out + in*kh*kw). Constraint: Σ rank_i * cost_i <= budget, 0 <= rank_i <= max_ranks[i].
    Greedy on σ²/cost: every (layer, j) candidate with σ_ij > 0 is sorted once by that density (descending
    spectra make each layer's densities non-increasing, so a layer is always taken as a prefix), the longest
    fitting prefix is taken, then the remaining candidates that still fit. That is optimal among allocations
    costing no more than the prefix and within one candidate's energy of the optimum; when the budget edge cuts
    an expensive layer the largest uniform rank fitting the budget can be better, and is returned instead then.
    A layer gets rank 0 when none of its candidates is bought (zero spectrum, max rank 0, or too dear).
    """
    if not len(spectra) == len(cost_per_rank) == len(max_ranks):
        raise ConfigError(
            f"allocate_ranks needs one cost and max rank per spectrum, got {len(spectra)} spectra, "
            f"{len(cost_per_rank)} costs and {len(max_ranks)} max ranks"
        )
    if budget < 0 or any(c <= 0 for c in cost_per_rank) or any(r < 0 for r in max_ranks):
        raise ConfigError("rank budget, per-rank costs and max ranks must be >= 0 (costs > 0)")
    if not spectra:
        return []
    energies = []
    for s, max_rank in zip(spectra, max_ranks, strict=True):
        energy = s.detach().to(device="cpu", dtype=torch.float64).square()[:max_rank]
        energies.append(energy[: int((energy > 0).sum())])
    costs = torch.tensor([int(c) for c in cost_per_rank], dtype=torch.int64)
    layer = torch.repeat_interleave(torch.arange(len(energies)), torch.tensor([e.numel() for e in energies]))
    gains = torch.cat(energies)
    order = torch.sort(gains / costs[layer], descending=True, stable=True).indices
    taken = _fill_budget(costs[layer[order]], int(budget))
    ranks = torch.bincount(layer[order][taken], minlength=len(energies)).tolist()
    uniform, uniform_energy = _best_uniform(energies, costs, int(budget))
    return uniform if uniform_energy > float(gains[order][taken].sum()) else ranks


def kept_energy(s: Tensor, rank: int) -> float:
    """Fraction of the energy kept at `rank`: Σ_{i<rank} σ_i² / Σ σ_i²; 1.0 for a zero spectrum."""
    energy = s.detach().to(dtype=torch.float64).square()
    total = float(energy.sum())
    return 1.0 if total == 0 else float(energy[:rank].sum()) / total


def relative_error(s: Tensor, rank: int) -> float:
    """Relative Frobenius error of the rank-`rank` truncation: sqrt(Σ_{i>=rank} σ_i² / Σ σ_i²) (Eckart–Young).

    Summed over the discarded tail rather than as sqrt(1 - kept_energy), which would cancel for small errors.
    0.0 for a zero spectrum.
    """
    energy = s.detach().to(dtype=torch.float64).square()
    total = float(energy.sum())
    return 0.0 if total == 0 else math.sqrt(float(energy[rank:].sum()) / total)


def _quantile(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q) with linear interpolation, for any size (torch.quantile refuses > 2**24 elements)."""
    position = q * (x.numel() - 1)
    lower = math.floor(position)
    low = torch.kthvalue(x, lower + 1).values
    if position == lower:
        return low
    high = torch.kthvalue(x, lower + 2).values
    return low + (high - low) * (position - lower)


def clamp_quantile(up: Tensor, down: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Clamp both factors to ±h, h = the q-quantile of all their entries (kohya's extract semantics).

    As in kohya's extract_lora_from_models.py, h is the quantile of the *signed* entries of up and down
    flattened together (torch.quantile, linear interpolation; kohya's default q is 0.99), not of their absolute
    values. q >= 1 returns the inputs unchanged (no clamping); q must be > 0.5, since below the median h would be
    negative or zero and the clamp would destroy the factors. Shapes are kept.
    """
    if q >= 1:
        return up, down
    if not q > 0.5:
        raise ConfigError(f"clamp quantile must be in (0.5, 1] (1 disables clamping), got {q}")
    high = _quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-high, high), down.clamp(-high, high)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±inf in ``tensor``: both reach its min or max (aminmax: 0.12 ns per fp16 element, isfinite 2.0)."""
    return not tensor.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())
