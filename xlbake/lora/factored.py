"""Factor-space SVD of a LoRA layer: every singular value of up @ down and its top singular vectors, from the
factors alone (their r x r Grams, never the out x in product). Pure tensor math, like ``xlbake.lora.lowrank``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xlbake.errors import InputError
from xlbake.lora.lowrank import Svd, svd_exact, to_matrix

# factor_svd takes the eigh of the squared r x r core only while every kept singular value is above this share of
# the largest: squaring costs s_i a relative error of (s_max / s_i)^2 eps64, at most 2e-8 here (below fp32's rounding).
_EIGH_MIN_RATIO = 1e-4


def factor_svd(up: Tensor, down: Tensor, keep: int | None = None) -> Svd:
    """Exact SVD of up @ down without forming the product, from the factors' r x r Gram matrices.

    up (m, r) or (m, r, 1, 1), down (r, n) or (r, in, kh, kw) with n = in*kh*kw. With the fp64 Cholesky factor
    upᵀ up = Lu Luᵀ, up = Qu Luᵀ with Qu orthonormal, so up @ down = Qu (Luᵀ down): the eigendecomposition
    K = Luᵀ (down downᵀ) Lu = Uc diag(s²) Ucᵀ of that r x r core gives every singular value of the product, the
    left vectors up Lu⁻ᵀ Uc and the right ones diag(1/s) Ucᵀ Luᵀ down (``_eigh_factor_svd``). Squaring into K costs
    a singular value s_i a relative error of about (s_max / s_i)² eps64 (an absolute one below sqrt(eps64) s_max),
    so this path is taken only while the smallest kept one is above _EIGH_MIN_RATIO s_max; below, the SVD of the
    core Luᵀ Ld (``_cholesky_factor_svd``, both Grams factored), which keeps small kept values' relative accuracy.
    A singular Gram (a zero or repeated direction) takes Householder QR of up and of downᵀ instead.
    Cost O((m + n) r^2), GEMMs only.
    Returns s of all k = min(m, n, r) values (zero factors give s = 0), u (m, t) and vh (t, n) for the top
    t = min(keep, k) (all k when keep is None).
    """
    up, down = to_matrix(up), to_matrix(down)
    if up.shape[1] != down.shape[0]:
        raise InputError(f"LoRA factors do not match: up {tuple(up.shape)} vs down {tuple(down.shape)}")
    rank = min(*up.shape, down.shape[1])
    top = rank if keep is None else min(keep, rank)
    if up.shape[1] <= min(up.shape[0], down.shape[1]):
        svd = _eigh_factor_svd(up, down, top)
        if svd is None:
            svd = _cholesky_factor_svd(up, down, top)
        if svd is not None:
            return svd
    q_up, r_up = torch.linalg.qr(up)  # (m, a), (a, r) with a = min(m, r)
    q_down, r_down = torch.linalg.qr(down.mT)  # (n, b), (b, r) with b = min(n, r)
    core = svd_exact(r_up @ r_down.mT, min(r_up.shape[0], r_down.shape[0]))
    return Svd(u=q_up @ core.u[:, :top], s=core.s, vh=core.vh[:top] @ q_down.mT)


def _eigh_factor_svd(up: Tensor, down: Tensor, top: int) -> Svd | None:
    """``factor_svd`` through eigh of K = Luᵀ (down downᵀ) Lu for up (m, r), down (r, n), r <= min(m, n).

    One Cholesky, one r x r eigh (about half an SVD's work) and no triangular solve for vh. None when upᵀ up is
    singular or a kept singular value is below _EIGH_MIN_RATIO of the largest (the caller then takes the SVD path).
    """
    low_up, info = torch.linalg.cholesky_ex((up.mT @ up).double())
    if info:
        return None
    core = low_up.mT @ (down @ down.mT).double() @ low_up
    values, vectors = torch.linalg.eigh(core)  # ascending
    s = values.flip(0).clamp(min=0).sqrt()
    kept = vectors[:, -top:].flip(1) if top else vectors[:, :0]
    if top and not (s[top - 1] > 0 and s[top - 1] >= _EIGH_MIN_RATIO * s[0]):
        return None
    left = torch.linalg.solve_triangular(low_up.mT, kept, upper=True).to(up.dtype)
    right = ((low_up @ kept) / s[:top]).to(down.dtype)  # (r, t): vhᵀ = downᵀ Lu Uc diag(1/s)
    return Svd(u=up @ left, s=s.to(up.dtype), vh=right.mT @ down)


def _cholesky_factor_svd(up: Tensor, down: Tensor, top: int) -> Svd | None:
    """``factor_svd`` through the SVD of the core Luᵀ Ld (both Grams factored); None when either is singular."""
    low_up, info_up = torch.linalg.cholesky_ex((up.mT @ up).double())
    low_down, info_down = torch.linalg.cholesky_ex((down @ down.mT).double())
    if info_up or info_down:
        return None
    core = svd_exact(low_up.mT @ low_down, up.shape[1])
    left = torch.linalg.solve_triangular(low_up.mT, core.u[:, :top], upper=True).to(up.dtype)
    right = torch.linalg.solve_triangular(low_down.mT, core.vh[:top].mT, upper=True).to(down.dtype)
    return Svd(u=up @ left, s=core.s.to(up.dtype), vh=(down.mT @ right).mT)
