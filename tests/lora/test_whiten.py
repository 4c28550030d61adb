"""Golden tests of the activation-aware (whitened) low-rank math on tiny fp64 tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from xlbake.errors import InputError
from xlbake.lora.lowrank import split_factors, svd_exact
from xlbake.lora.whiten import (
    DAMPING,
    unwhiten,
    whiten,
    whiten_scaled,
    whitened_error,
    whitened_factor_svd,
    whitened_factors,
    whitened_resize,
    whitening_factor,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """E[x xᵀ] of samples x (n, in)."""
    return x.mT @ x / x.shape[0]


def anisotropic_inputs(n: int, dim: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """Samples (n, dim) with very unequal energy per direction (confined to `rank` directions if given)."""
    g = gen(seed)
    k = rank or dim
    basis = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=F64)).Q
    scales = torch.logspace(1, -2, k, dtype=F64)
    return (torch.randn(n, k, generator=g, dtype=F64) * scales) @ basis.mT


def test_identity_moment_gives_plain_svd():
    delta = torch.randn(12, 9, generator=gen(1), dtype=F64)
    up, down, _ = whitened_factors(delta, torch.eye(9, dtype=F64), 4)
    plain_up, plain_down = split_factors(svd_exact(delta, 4), 4)
    torch.testing.assert_close(up @ down, plain_up @ plain_down, rtol=1e-10, atol=1e-10)
    # without damping the factors themselves are kohya's (U Σ^½, Σ^½ Vᵀ)
    up0, down0, _ = whitened_factors(delta, torch.eye(9, dtype=F64), 4, damping=0.0)
    torch.testing.assert_close(up0, plain_up, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(down0, plain_down, rtol=1e-10, atol=1e-10)


def test_metric_is_the_expected_output_error_linear_and_conv1x1():
    delta = torch.randn(6, 5, generator=gen(2), dtype=F64)
    up, down = torch.randn(6, 2, generator=gen(3), dtype=F64), torch.randn(2, 5, generator=gen(4), dtype=F64)
    x = anisotropic_inputs(200, 5, seed=5)
    error = delta - up @ down
    expected = math.sqrt(float((x @ error.mT).square().sum(1).mean()))
    assert whitened_error(delta, up, down, second_moment(x)) == pytest.approx(expected, rel=1e-10)
    # a 1x1 conv is the same linear map of each pixel's channels: C is the channel moment over all pixels
    images = x.reshape(8, 25, 5).permute(0, 2, 1).reshape(8, 5, 5, 5)
    out = F.conv2d(images, error[:, :, None, None])
    conv_expected = math.sqrt(float(out.square().sum(1).mean()))
    conv_delta = delta[:, :, None, None]
    assert whitened_error(conv_delta, up[:, :, None, None], down[:, :, None, None], second_moment(x)) == pytest.approx(
        conv_expected, rel=1e-10
    )
    conv_up, conv_down, _ = whitened_factors(conv_delta, second_moment(x), 3)
    lin_up, lin_down, _ = whitened_factors(delta, second_moment(x), 3)
    torch.testing.assert_close(conv_up @ conv_down, lin_up @ lin_down)


def test_rank_deficient_moment_meets_the_whitened_eckart_young_bound():
    delta = torch.randn(10, 8, generator=gen(6), dtype=F64)
    c = second_moment(anisotropic_inputs(50, 8, seed=7, rank=3))  # inputs span 3 of 8 directions
    assert int(torch.linalg.matrix_rank(c)) == 3
    factor = whitening_factor(c)
    torch.testing.assert_close(factor @ factor.mT, c + DAMPING * float(torch.trace(c)) / 8 * torch.eye(8, dtype=F64))
    up, down, svd = whitened_factors(delta, c, 2)
    assert torch.isfinite(down).all()
    error = float(torch.linalg.norm(whiten(delta - up @ down, factor)))
    bound = math.sqrt(float(torch.linalg.svdvals(whiten(delta, factor))[2:].square().sum()))
    assert error == pytest.approx(bound, rel=1e-9)
    torch.testing.assert_close(svd.s, torch.linalg.svdvals(delta @ factor)[:2])


def test_whitened_beats_plain_svd_on_real_inputs():
    delta = torch.randn(16, 12, generator=gen(8), dtype=F64)
    c = second_moment(anisotropic_inputs(400, 12, seed=9))
    up, down, _ = whitened_factors(delta, c, 3)
    plain_up, plain_down = split_factors(svd_exact(delta, 3), 3)
    assert whitened_error(delta, up, down, c) < 0.8 * whitened_error(delta, plain_up, plain_down, c)


def test_resize_in_factor_space_equals_extraction_at_the_smaller_rank():
    g = gen(10)
    up, down = torch.randn(20, 8, generator=g, dtype=F64), torch.randn(8, 15, generator=g, dtype=F64)
    c = second_moment(anisotropic_inputs(30, 15, seed=11, rank=10))
    small_up, small_down, resized = whitened_resize(up, down, c, 3)
    ref_up, ref_down, extracted = whitened_factors(up @ down, c, 3)
    torch.testing.assert_close(small_up @ small_down, ref_up @ ref_down, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resized.s[:3], extracted.s, rtol=1e-5, atol=1e-5)
    # conv 1x1 LoCon factors resize the same way
    conv_up, conv_down, _ = whitened_resize(up[:, :, None, None], down[:, :, None, None], c, 3)
    torch.testing.assert_close(conv_up @ conv_down, ref_up @ ref_down, rtol=1e-5, atol=1e-5)


def test_resize_to_a_rank_at_least_the_old_one_keeps_the_delta():
    g = gen(12)
    up, down = torch.randn(9, 4, generator=g, dtype=F64), torch.randn(4, 7, generator=g, dtype=F64)
    c = second_moment(anisotropic_inputs(40, 7, seed=13))
    new_up, new_down, _ = whitened_resize(up, down, c, 6)
    torch.testing.assert_close(new_up @ new_down, up @ down)


def test_zero_moment_falls_back_to_plain_svd_and_bad_moments_are_refused():
    assert torch.equal(whitening_factor(torch.zeros(4, 4)), torch.eye(4, dtype=F64))
    with pytest.raises(InputError, match="positive semidefinite"):
        whitening_factor(-torch.eye(3, dtype=F64))
    with pytest.raises(InputError, match="positive semidefinite"):
        whitening_factor(torch.diag(torch.tensor([1.0, -0.5], dtype=F64)))
    with pytest.raises(InputError, match="square"):
        whitening_factor(torch.zeros(3, 4))
    with pytest.raises(InputError, match="does not match"):
        whiten(torch.zeros(2, 5), torch.eye(4, dtype=F64))


def test_unwhiten_inverts_the_factor():
    c = second_moment(anisotropic_inputs(20, 6, seed=14))
    factor = whitening_factor(c)
    down = torch.randn(3, 6, generator=gen(15), dtype=F64)
    torch.testing.assert_close(unwhiten(down @ factor, factor), down)


def test_scaled_whitening_keeps_the_weight_energy_and_the_optimum():
    delta = torch.randn(10, 7, generator=gen(16), dtype=F64)
    c = 50 * second_moment(anisotropic_inputs(30, 7, seed=17))
    whitened, scaled = whiten_scaled(delta, whitening_factor(c))
    assert float(whitened.square().sum()) == pytest.approx(float(delta.square().sum()), rel=1e-12)
    up, down = split_factors(svd_exact(whitened, 3), 3)
    ref_up, ref_down, _ = whitened_factors(delta, c, 3)
    torch.testing.assert_close(up @ unwhiten(down, scaled), ref_up @ ref_down)
    zero, same = whiten_scaled(torch.zeros(3, 7, dtype=F64), whitening_factor(c))
    assert not zero.any() and torch.equal(same, whitening_factor(c))


def test_factor_svd_in_the_scaled_metric_gives_the_whitened_resize():
    g = gen(18)
    up, down = torch.randn(12, 6, generator=g, dtype=F64), torch.randn(6, 9, generator=g, dtype=F64)
    c = second_moment(anisotropic_inputs(40, 9, seed=19))
    svd = whitened_factor_svd(up, down, whitening_factor(c))
    assert float(svd.s.square().sum()) == pytest.approx(float((up @ down).square().sum()), rel=1e-10)
    small_up, small_down = split_factors(svd, 2)
    ref_up, ref_down, _ = whitened_resize(up, down, c, 2)
    torch.testing.assert_close(small_up @ small_down, ref_up @ ref_down, rtol=1e-6, atol=1e-8)
