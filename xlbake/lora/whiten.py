"""Activation-aware ("whitened") low-rank math: keep what a layer's real inputs see, not the most weight energy.

A layer y = W x with inputs of second moment C = E[x xᵀ] (in, in) changes its outputs by ΔW x; the expected
squared output error of a low-rank B A is E‖(ΔW − B A) x‖² = ‖(ΔW − B A) S‖_F² for any S with S Sᵀ = C.
The rank-r optimum (ASVD / SVD-LLM) is the truncated SVD of the *whitened* difference ΔW S = U Σ Vᵀ mapped back:
up = U_r Σ_r^½, down = Σ_r^½ V_rᵀ S⁻¹. S is the Cholesky factor of C + λ·(tr C / in)·I: the damping λ keeps S
invertible when C is rank-deficient (directions the calibration inputs never visit) and keeps S⁻¹ from blowing
up down's rows along them; in those directions the damped metric still weighs ΔW a little, so they are not
dropped blindly. With C = I every function here equals plain SVD extraction.

Pure functions of tensors (xlbake.lora.lowrank conventions); the small (in, in) parts run in fp64. S is either the
dense Cholesky factor (:func:`whitening_factor`, for a dense C) or, as extract and resize use it, the factored
symmetric root of a calibration file's compressed moment (:mod:`xlbake.lora.moments`: top eigenpairs + isotropic
remainder, S applied in 4·k·out·in flops and inverted analytically); the optimum depends only on S Sᵀ.

Convolutions: a 1x1 conv is a linear map of each pixel's channels, so C is the (in, in) channel moment over all
pixels and the matrix view of :func:`xlbake.lora.lowrank.to_matrix` applies unchanged. A kh x kw conv is a linear
map of unfolded patches, whose index in to_matrix's (out, in·kh·kw) view is c·t + p (channel c, tap p of t = kh·kw,
channel-major like F.unfold); their exact moment is (t·in)² numbers (1.3e8 for one 1280-channel SDXL conv). It is
approximated by a Kronecker product C ⊗ T: C the (in, in) channel moment over all
pixels, T the (t, t) moment between taps averaged over channels, scaled to mean diagonal 1. Exact when every
channel has the same spatial correlation; it keeps what matters most, which channel directions carry the energy
and how strongly neighbouring pixels move together, for in² + 81 numbers. S = S_C ⊗ S_T is applied by reshapes,
never formed, and the damping λ is split as √λ on each factor so that the damped form's smallest eigenvalue is again
at least λ times the mean eigenvalue of C ⊗ T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xlbake.errors import InputError
from xlbake.lora.factored import factor_svd
from xlbake.lora.lowrank import Svd, split_factors, svd_exact, to_matrix
from xlbake.lora.moments import KronWhitening, Whitening

Factor = Tensor | Whitening | KronWhitening
"""A whitening factor S: a dense lower-triangular (in, in) (:func:`whitening_factor`) or the factored symmetric
root of a compressed moment, a conv's Kronecker one included (:func:`xlbake.lora.moments.moment_whitening`)."""

DAMPING = 1e-3
"""λ: added to C as λ·(mean eigenvalue of C)·I before factoring. Small enough that the whitened metric is C's
(1e-3 of the mean input energy), large enough that the Cholesky factor exists and S⁻¹ stays bounded for a
rank-deficient C (a few calibration samples of a wide layer, or inputs confined to a subspace)."""


def whitening_factor(c: Tensor, damping: float = DAMPING) -> Tensor:
    """Lower-triangular S (in, in), fp64, with S Sᵀ = C + damping·(tr C / in)·I; C (in, in) symmetric PSD.

    A zero C (a layer that saw no input) gives the identity: the metric then carries no information and
    whitened extraction falls back to plain SVD.
    """
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise InputError(f"expected a square second-moment matrix, got shape {tuple(c.shape)}")
    c64 = c.detach().to(torch.float64)
    c64 = (c64 + c64.mT) / 2  # accumulated in floating point: symmetric only up to rounding
    n = c64.shape[0]
    mean = float(torch.trace(c64)) / n
    if not mean >= 0:  # negative or NaN: not a second moment
        raise InputError(f"second-moment matrix is not positive semidefinite (mean eigenvalue {mean:g})")
    if mean == 0:
        return torch.eye(n, dtype=torch.float64, device=c.device)
    eye = torch.eye(n, dtype=torch.float64, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c64 + damping * mean * eye)
    if int(info) != 0:
        raise InputError(f"second-moment matrix is not positive semidefinite (Cholesky failed at column {int(info)})")
    return factor


def whiten(delta: Tensor, factor: Factor) -> Tensor:
    """ΔW S: the difference (out, in) (or a conv weight, as a matrix) in the whitened metric, in delta's dtype."""
    m = to_matrix(delta)
    if not isinstance(factor, Tensor):
        return factor.apply(m)
    if m.shape[1] != factor.shape[0]:
        raise InputError(f"difference {tuple(m.shape)} does not match a whitening factor of size {factor.shape[0]}")
    return m @ factor.to(m.dtype)


def whiten_scaled(delta: Tensor, factor: Factor) -> tuple[Tensor, Factor]:
    """(ΔW S', S') with S' = S·‖ΔW‖_F / ‖ΔW S‖_F: the whitened difference at the weight difference's own size.

    A scalar on the metric does not change which rank-r factors are optimal, but it puts the whitened spectrum on
    the same scale as ΔW's: Σσ² = ‖ΔW‖², so kept-energy fractions, energy-based rank criteria and budgets across
    layers (some whitened, some not) stay comparable: a layer's weight energy decides its share, its inputs decide
    which directions within it are kept. A zero difference is returned with S unchanged.
    """
    whitened = whiten(delta, factor)
    norm, whitened_norm = float(torch.linalg.vector_norm(to_matrix(delta))), float(torch.linalg.vector_norm(whitened))
    if not whitened_norm > 0:
        return whitened, factor
    scale = norm / whitened_norm
    return whitened * scale, factor * scale


def unwhiten(down: Tensor, factor: Factor) -> Tensor:
    """down S⁻¹ for a whitened down factor (r, in), by a triangular solve (no explicit inverse), in down's dtype."""
    if not isinstance(factor, Tensor):
        return factor.solve(down.to(torch.float64)).to(down.dtype)
    solved = torch.linalg.solve_triangular(factor, down.to(torch.float64), upper=False, left=False)
    return solved.to(down.dtype)


def whitened_factors(delta: Tensor, c: Tensor, rank: int, damping: float = DAMPING) -> tuple[Tensor, Tensor, Svd]:
    """Rank-`rank` up (out, r), down (r, in) minimising ‖(ΔW − up down) S‖_F, and the whitened SVD (exact).

    Its singular values are those of ΔW S: the Eckart–Young bound in the whitened metric.
    """
    factor = whitening_factor(c, damping)
    svd = svd_exact(whiten(delta.to(torch.float64), factor), rank)
    up, down = split_factors(svd, rank)
    return up, unwhiten(down, factor), svd


def whitened_resize(
    up: Tensor, down: Tensor, c: Tensor, rank: int, damping: float = DAMPING
) -> tuple[Tensor, Tensor, Svd]:
    """Rank-`rank` factors of up (out, r) @ down (r, in) optimal in the whitened metric, in factor space.

    QR of up and of (down S)ᵀ and an r×r core SVD (:func:`factor_svd`): never the (out, in) product. Equals
    :func:`whitened_factors` of the product at `rank`. Returns fp64 up, down and the whitened SVD.
    """
    factor = whitening_factor(c, damping)
    svd = factor_svd(to_matrix(up).to(torch.float64), whiten(down.to(torch.float64), factor))
    new_up, new_down = split_factors(svd, rank)
    return new_up, unwhiten(new_down, factor), svd


def whitened_factor_svd(up: Tensor, down: Tensor, factor: Factor) -> Svd:
    """The SVD of up (out, r) @ down (r, in) in the scaled whitened metric of :func:`whiten_scaled`, from the
    factors only, with vh mapped back to the weight's input space.

    u (out, k) and s (k,) as :func:`factor_svd` of (up, down S'); vh (k, in) = vh_w S'⁻¹, no longer orthonormal,
    so :func:`split_factors` at rank r gives factors whose product is the whitened rank-r optimum. Σσ² = ‖up down‖²
    (Frobenius norms from r×r Gram matrices, never the product). In up's dtype.
    """
    up, down = to_matrix(up), to_matrix(down)
    whitened = whiten(down, factor)
    gram_up = up.mT @ up
    norm = float(torch.sum(gram_up * (down @ down.mT)).clamp(min=0)) ** 0.5
    whitened_norm = float(torch.sum(gram_up * (whitened @ whitened.mT)).clamp(min=0)) ** 0.5
    if whitened_norm > 0:
        factor = factor * (norm / whitened_norm)
        whitened = whitened * (norm / whitened_norm)
    svd = factor_svd(up, whitened)
    return Svd(u=svd.u, s=svd.s, vh=unwhiten(svd.vh, factor))


def whitened_error(delta: Tensor, up: Tensor, down: Tensor, c: Tensor) -> float:
    """‖(ΔW − up down) C^½‖_F = sqrt(tr(E C Eᵀ)): the RMS output error over the inputs C was measured on."""
    error = to_matrix(delta).double() - to_matrix(up).double() @ to_matrix(down).double()
    return float(torch.einsum("oi,ij,oj->", error, c.double(), error).clamp(min=0).sqrt())
