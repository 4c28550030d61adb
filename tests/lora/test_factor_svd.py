"""factor_svd's fast path (eigh of the squared r x r core) against its reference (SVD of the Cholesky core)."""

import pytest
import torch

from xlbake.lora.factored import _cholesky_factor_svd, _eigh_factor_svd, factor_svd

F32, F64 = torch.float32, torch.float64


def trained_like(out: int, rank: int, width: int, decades: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 factors like a trained LoRA's: a spectrum over ``decades`` decades, mixed by a rotation (graded rows
    would hide the squaring's loss: eigh keeps their small eigenvalues' relative accuracy)."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -decades, rank, dtype=F64)[:, None]
    rotation = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=F64)).Q
    down = rotation @ (torch.randn(rank, width, generator=g, dtype=F64) * decay)
    return torch.randn(out, rank, generator=g), down.float()


def top_product(svd, top: int) -> torch.Tensor:
    return (svd.u[:, :top].double() * svd.s[:top].double()) @ svd.vh[:top].double()


@pytest.mark.parametrize(("out", "rank", "width", "keep"), [(300, 32, 200, 8), (90, 40, 150, 40), (64, 64, 640, 16)])
def test_eigh_path_equals_the_svd_path(out, rank, width, keep):
    up, down = trained_like(out, rank, width, decades=2.5, seed=out)
    fast, reference = _eigh_factor_svd(up, down, keep), _cholesky_factor_svd(up, down, keep)
    assert fast is not None and reference is not None
    s0 = float(reference.s[0])
    assert float((fast.s.double() - reference.s.double()).abs().max()) <= 1e-6 * s0
    exact = torch.linalg.svdvals(up.double() @ down.double())[:rank]
    assert float((fast.s.double() - exact).abs().max()) <= 1e-4 * float(exact[0])  # the bench's exactness goal
    scale = float(top_product(reference, keep).norm())
    assert float((top_product(fast, keep) - top_product(reference, keep)).norm()) <= 1e-5 * scale
    for fast_vectors, reference_vectors in ((fast.u.double().T, reference.u.double().T), (fast.vh, reference.vh)):
        assert orthonormality_error(fast_vectors) <= orthonormality_error(reference_vectors) + 1e-6


def orthonormality_error(rows: torch.Tensor) -> float:
    rows = rows.double()
    return float((rows @ rows.T - torch.eye(rows.shape[0], dtype=F64)).abs().max())


def test_tiny_kept_singular_values_take_the_svd_path():
    # kept singular values 1e-7 of the largest: squared in the eigh core they lose their relative accuracy
    up, down = trained_like(120, 24, 100, decades=7, seed=3)
    up, down = up.double(), down.double()
    assert _eigh_factor_svd(up, down, 24) is None
    assert _eigh_factor_svd(up, down, 4) is not None
    reference = _cholesky_factor_svd(up, down, 24)
    assert float(((factor_svd(up, down).s - reference.s) / reference.s).abs().max()) <= 1e-9


def test_zero_down_is_not_divided_by_its_zero_singular_values():
    up = torch.randn(20, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    svd = factor_svd(up, torch.zeros(4, 30, dtype=F64), keep=2)
    assert torch.equal(svd.s, torch.zeros(4, dtype=F64))
    assert torch.isfinite(svd.u).all() and torch.isfinite(svd.vh).all()
