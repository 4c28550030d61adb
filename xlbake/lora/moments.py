"""Compressed input second moments and the whitening factors built from them, never as dense (in, in) matrices.

A layer's input moment C = E[x xᵀ] (in, in) is kept as its top-k eigenpairs and an isotropic remainder:

    C ≈ U diag(λ) Uᵀ + ρ (I − U Uᵀ),   U (in, k) orthonormal, ρ = (tr C − Σλ) / (in − k)

(k = in: exactly C). The trace, which sets the damping, is C's own. Inputs of deep networks put most of their energy
in a few directions (a handful of outlier channels, the token mean), so the top eigenpairs carry what whitening
needs: which input directions matter most. The remainder keeps the right total weight on the rest, only evenly
spread; a layer whose inputs never visit a direction is then treated like a damped one, which whitening does
anyway. Storing it costs in·k + k + 1 numbers instead of in² (5120-wide SDXL inputs: 1.3 M instead of 26 M).

Its whitening factor is the symmetric square root of the damped form (δ = damping · tr C / in, as
:func:`xlbake.lora.whiten.whitening_factor`), with an analytic inverse:

    S = U diag(√(λ+δ)) Uᵀ + √(ρ+δ) (I − U Uᵀ),   S⁻¹ = U diag(1/√(λ+δ)) Uᵀ + (I − U Uᵀ)/√(ρ+δ),   S Sᵀ = C + δ I,

applied to an (out, in) matrix as √(ρ+δ)·m + (m U) diag(√(λ+δ) − √(ρ+δ)) Uᵀ: 4·k·out·in flops, not the 2·in·out·in
of a dense S, and the (in, in) S is never formed. Pure functions of tensors (xlbake.lora.lowrank conventions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xlbake.errors import InputError

MOMENT_RANK = 128
"""k: eigenpairs kept of each input moment. Whitening a (out, in) difference then costs 4·k·out·in flops, against
about 9·(rank + oversample)·out·in for extract's rank-128 fast SVD (4 block Krylov product pairs and vh), so
calibrated extraction stays near the plain one's time (benchmarks/bench_whiten.py: 1.02x on SDXL-shaped layers at
1 thread; a dense S cost 4.7x), and a real SDXL calibration file is 0.61 GB."""
_SUBSPACE_ITERS = 8  # subspace iterations for the top-k eigenpairs of a wide moment (in²·k flops each)


@dataclass(frozen=True, eq=False)
class Moment:
    """C ≈ basis diag(values) basisᵀ + rest·(I − basis basisᵀ): an input second moment, compressed."""

    basis: Tensor  # (in, k) orthonormal columns (fp64 when computed, fp32 as stored)
    values: Tensor  # (k,) eigenvalues along basis, >= 0
    rest: float  # ρ: the mean eigenvalue of the remainder (0 when k = in)
    taps: Tensor | None = None  # a kh x kw conv's (t, t) moment between its t = kh·kw kernel taps, mean diagonal 1

    @property
    def size(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def trace(self) -> float:
        return float(self.values.double().sum()) + self.rest * (self.size - self.rank)

    def dense(self) -> Tensor:
        """The (in, in) matrix this form stands for, fp64 (for tests and measurements; never in extraction); for a
        conv, the (in·t, in·t) im2col moment C ⊗ T."""
        basis = self.basis.double()
        eye = torch.eye(self.size, dtype=torch.float64, device=basis.device)
        channel = (basis * (self.values.double() - self.rest)) @ basis.mT + self.rest * eye
        return channel if self.taps is None else torch.kron(channel, self.taps.double().to(channel.device))


def compress(c: Tensor, rank: int = MOMENT_RANK, seed: int = 0, taps: Tensor | None = None) -> Moment:
    """The top-``rank`` eigenpairs of C (in, in) symmetric PSD and the mean of the rest, in fp64 on C's device.

    All eigenpairs (exact) when 2·rank >= in; otherwise ``_SUBSPACE_ITERS`` rounds of subspace iteration on rank + 16
    vectors and Rayleigh-Ritz (in²·rank flops per round, not an in³ eigendecomposition), Gaussian start from ``seed``.
    The remainder ρ takes the trace the eigenpairs miss, so the form's trace is C's. ``taps`` (t, t): a conv's tap
    moment (see :func:`tap_moment`), kept as it is.
    """
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise InputError(f"expected a square second-moment matrix, got shape {tuple(c.shape)}")
    c64 = c.detach().to(torch.float64)
    c64 = (c64 + c64.mT) / 2
    n, k = c64.shape[0], min(rank, c64.shape[0])
    if 2 * k >= n:
        values, vectors = torch.linalg.eigh(c64)
    else:
        generator = torch.Generator(device=c64.device).manual_seed(seed)
        q = torch.randn(n, min(k + 16, n), generator=generator, dtype=torch.float64, device=c64.device)
        for _ in range(_SUBSPACE_ITERS):
            q = torch.linalg.qr(c64 @ q).Q
        values, small = torch.linalg.eigh(q.mT @ c64 @ q)
        vectors = q @ small
    values, vectors = values.flip(0)[:k].clamp_min(0), vectors.flip(1)[:, :k]
    rest = max(float(torch.trace(c64)) - float(values.sum()), 0.0) / (n - k) if k < n else 0.0
    return Moment(basis=vectors, values=values, rest=rest, taps=taps)


def tap_moment(sums: Tensor) -> Tensor:
    """T (t, t) from sums over patches and channels of x_c(tap p)·x_c(tap q), scaled to mean diagonal 1 (zero if
    the conv saw no input): with C the channel moment over all pixels, C ⊗ T approximates the im2col moment."""
    sums = sums.double()
    mean = float(torch.diagonal(sums).mean())
    return sums / mean if mean > 0 else torch.zeros_like(sums)


@dataclass(frozen=True, eq=False)
class Whitening:
    """S = basis diag(roots) basisᵀ + rest_root·(I − basis basisᵀ) (in, in), symmetric, kept in factored form."""

    basis: Tensor  # (in, k) orthonormal columns, fp64
    roots: Tensor  # (k,) > 0
    rest_root: float  # > 0

    @property
    def size(self) -> int:
        return self.basis.shape[0]

    def apply(self, m: Tensor) -> Tensor:
        """m S for m (rows, in), in m's dtype."""
        return self._times(m, self.roots, self.rest_root)

    def solve(self, m: Tensor) -> Tensor:
        """m S⁻¹ for m (rows, in), in m's dtype."""
        return self._times(m, 1 / self.roots, 1 / self.rest_root)

    def __mul__(self, scale: float) -> Whitening:
        return Whitening(self.basis, self.roots * scale, self.rest_root * scale)

    def _times(self, m: Tensor, along: Tensor, rest: float) -> Tensor:
        if m.shape[-1] != self.size:
            raise InputError(f"difference {tuple(m.shape)} does not match a whitening factor of size {self.size}")
        basis = self.basis.to(device=m.device, dtype=m.dtype)
        gain = (along - rest).to(device=m.device, dtype=m.dtype)
        if 2 * basis.shape[1] >= self.size:  # k near in: one (in, in) product is cheaper than two of width k
            dense = (basis * gain) @ basis.mT
            return torch.addmm(m, m, dense, beta=rest)
        return torch.addmm(m, (m @ basis) * gain, basis.mT, beta=rest)


@dataclass(frozen=True, eq=False)
class KronWhitening:
    """S = S_C ⊗ S_T for a conv's im2col inputs (index c·t + p, as to_matrix flattens (out, in, kh, kw)), applied by
    reshapes: the channel factor along the channels of every tap, the (t, t) tap factor along the taps."""

    channel: Whitening
    taps: Tensor  # (t, t) symmetric root of the damped tap moment, fp64
    taps_inverse: Tensor

    @property
    def size(self) -> int:
        return self.channel.size * self.taps.shape[0]

    def apply(self, m: Tensor) -> Tensor:
        """m S for m (rows, in·t), in m's dtype."""
        return self._times(m, self.channel.apply, self.taps)

    def solve(self, m: Tensor) -> Tensor:
        """m S⁻¹ for m (rows, in·t), in m's dtype."""
        return self._times(m, self.channel.solve, self.taps_inverse)

    def __mul__(self, scale: float) -> KronWhitening:
        return KronWhitening(self.channel * scale, self.taps, self.taps_inverse)

    def _times(self, m: Tensor, along_channels: Callable[[Tensor], Tensor], taps: Tensor) -> Tensor:
        if m.shape[-1] != self.size:
            raise InputError(f"difference {tuple(m.shape)} does not match a whitening factor of size {self.size}")
        rows, t = m.shape[0], taps.shape[0]
        by_tap = (m.reshape(rows, -1, t) @ taps.to(device=m.device, dtype=m.dtype)).transpose(1, 2)  # (rows, t, in)
        return along_channels(by_tap.reshape(rows * t, -1)).reshape(rows, t, -1).transpose(1, 2).reshape(rows, -1)


def moment_whitening(moment: Moment, damping: float) -> Whitening | KronWhitening:
    """The symmetric square root S of the damped ``moment`` (see the module docstring): S Sᵀ = C + δ I with
    δ = damping · tr C / in. A zero moment (a layer that saw no input) gives the identity: plain SVD.

    A conv's C ⊗ T: (C + δ_C I) ⊗ (T + δ_T I) with √damping on each factor, so that the damped form's smallest
    eigenvalue is at least damping times the mean eigenvalue of C ⊗ T, as for a Linear layer.
    """
    if moment.taps is None:
        return _whitening(moment, damping)
    split = damping**0.5
    taps = moment.taps.double()
    taps = (taps + taps.mT) / 2
    mean = float(torch.trace(taps)) / taps.shape[0]
    if mean == 0:  # the conv saw no input
        eye = torch.eye(taps.shape[0], dtype=torch.float64, device=taps.device)
        return KronWhitening(_whitening(moment, split), eye, eye)
    values, vectors = torch.linalg.eigh(taps + split * mean * torch.eye(taps.shape[0], dtype=torch.float64))
    if not float(values[0]) > 0:
        raise InputError(f"tap moment is not positive semidefinite (smallest eigenvalue {float(values[0]):g})")
    root, inverse = (vectors * values.sqrt()) @ vectors.mT, (vectors * values.rsqrt()) @ vectors.mT
    return KronWhitening(_whitening(moment, split), root, inverse)


def _whitening(moment: Moment, damping: float) -> Whitening:
    """S of the channel part of ``moment`` damped by ``damping`` (the taps are the caller's)."""
    n = moment.size
    values = moment.values.double()
    mean = moment.trace() / n
    if not mean >= 0 or not bool((values >= 0).all()) or moment.rest < 0:
        raise InputError(f"second-moment matrix is not positive semidefinite (mean eigenvalue {mean:g})")
    if mean == 0:
        return Whitening(moment.basis.double()[:, :0], values[:0], 1.0)
    delta = damping * mean
    rest_root = (moment.rest + delta) ** 0.5 if moment.rank < n else 1.0  # no remainder: any value, S is exact
    if rest_root == 0:
        raise InputError("a moment with an empty remainder needs damping > 0 to be inverted")
    return Whitening(moment.basis.double(), (values + delta).sqrt(), rest_root)
