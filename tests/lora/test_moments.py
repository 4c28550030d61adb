"""Golden tests of compressed input moments and their factored whitening on tiny fp64 tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from xlbake.errors import InputError
from xlbake.lora.lowrank import split_factors, svd_exact
from xlbake.lora.moments import Moment, compress, moment_whitening
from xlbake.lora.whiten import DAMPING, unwhiten, whiten, whitened_error, whitened_factors

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def power_law_moment(dim: int, seed: int, decay: float = 1.5) -> torch.Tensor:
    """A dense PSD moment with eigenvalues ~ i^-decay in a random basis (like real activations: a few dominate)."""
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen(seed), dtype=F64)).Q
    values = torch.arange(1, dim + 1, dtype=F64) ** -decay
    return (basis * values) @ basis.mT


def spiked_moment(dim: int, k: int, rest: float, seed: int) -> torch.Tensor:
    """Exactly top-k spikes plus an isotropic remainder: what the compressed form represents without loss."""
    basis = torch.linalg.qr(torch.randn(dim, k, generator=gen(seed), dtype=F64)).Q
    values = torch.logspace(2, 0.5, k, dtype=F64)
    return (basis * (values - rest)) @ basis.mT + rest * torch.eye(dim, dtype=F64)


def whitened_extraction(delta: torch.Tensor, moment: Moment, rank: int) -> tuple[torch.Tensor, ...]:
    """up, down and the whitened singular values through the factored whitening (as extract does)."""
    factor = moment_whitening(moment, DAMPING)
    svd = svd_exact(whiten(delta, factor), min(delta.shape))
    up, down = split_factors(svd, rank)
    return up, unwhiten(down, factor), svd.s


def test_full_rank_compression_equals_the_dense_path():
    c = power_law_moment(12, seed=1)
    moment = compress(c, rank=12)
    torch.testing.assert_close(moment.dense(), c)
    delta = torch.randn(9, 12, generator=gen(2), dtype=F64)
    up, down, s = whitened_extraction(delta, moment, 4)
    ref_up, ref_down, ref = whitened_factors(delta, c, 4)  # the Cholesky factor: another S, the same metric
    torch.testing.assert_close(up @ down, ref_up @ ref_down)
    torch.testing.assert_close(s[:4], ref.s)


def test_the_factor_is_a_square_root_of_the_damped_form_and_solve_inverts_it():
    c = power_law_moment(40, seed=3)
    moment = compress(c, rank=6)
    factor = moment_whitening(moment, DAMPING)
    eye = torch.eye(40, dtype=F64)
    dense_s = factor.apply(eye)
    damped = moment.dense() + DAMPING * moment.trace() / 40 * eye
    torch.testing.assert_close(dense_s @ dense_s.mT, damped)
    torch.testing.assert_close(factor.solve(dense_s), eye)
    assert moment.trace() == pytest.approx(float(torch.trace(c)), rel=1e-12)  # damping keeps C's own scale


def test_spiked_moment_is_compressed_without_loss_by_subspace_iteration():
    c = spiked_moment(60, 5, rest=0.3, seed=4)
    moment = compress(c, rank=5)  # 2k < in: the randomized path
    assert moment.rank == 5 and moment.rest == pytest.approx(0.3, rel=1e-9)
    torch.testing.assert_close(moment.dense(), c)


def test_whitened_error_in_the_compressed_metric_is_its_eckart_young_tail():
    c = power_law_moment(30, seed=5)
    moment = compress(c, rank=8)
    delta = torch.randn(20, 30, generator=gen(6), dtype=F64)
    up, down, s = whitened_extraction(delta, moment, 5)
    damped = moment.dense() + DAMPING * moment.trace() / 30 * torch.eye(30, dtype=F64)
    assert whitened_error(delta, up, down, damped) == pytest.approx(math.sqrt(float(s[5:].square().sum())), rel=1e-9)
    # the compressed metric's optimum is within its approximation of the true one: measured in the true C it is
    # no better than the dense optimum, and close to it when the top eigenpairs hold most of the trace
    dense_up, dense_down, _ = whitened_factors(delta, c, 5)
    best = whitened_error(delta, dense_up, dense_down, c)
    found = whitened_error(delta, up, down, c)
    assert best <= found < 1.1 * best


def test_compressed_whitening_beats_plain_svd_in_the_true_metric():
    c = power_law_moment(64, seed=7, decay=2.5)
    delta = torch.randn(48, 64, generator=gen(8), dtype=F64)
    up, down, _ = whitened_extraction(delta, compress(c, rank=8), 6)
    plain_up, plain_down = split_factors(svd_exact(delta, 6), 6)
    assert whitened_error(delta, up, down, c) < 0.8 * whitened_error(delta, plain_up, plain_down, c)


def test_zero_and_broken_moments():
    zero = compress(torch.zeros(10, 10), rank=3)
    identity = moment_whitening(zero, DAMPING).apply(torch.eye(10, dtype=F64))
    torch.testing.assert_close(identity, torch.eye(10, dtype=F64))
    with pytest.raises(InputError, match="positive semidefinite"):
        moment_whitening(Moment(torch.eye(4, 2), torch.tensor([1.0, -2.0]), 0.0), DAMPING)
    with pytest.raises(InputError, match="does not match"):
        moment_whitening(compress(torch.eye(4), rank=2), DAMPING).apply(torch.zeros(2, 5))
    with pytest.raises(InputError, match="square"):
        compress(torch.zeros(3, 4))


def random_psd(dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(dim, 3 * dim, generator=gen(seed), dtype=F64) * torch.logspace(0, -2, 3 * dim, dtype=F64)
    return x @ x.mT


def test_conv_whitening_by_the_kronecker_moment_equals_the_dense_path():
    channels, taps = random_psd(5, 20), random_psd(9, 21)
    taps = taps / torch.diagonal(taps).mean()
    moment = compress(channels, rank=5, taps=taps)
    torch.testing.assert_close(moment.dense(), torch.kron(channels, taps))
    delta = torch.randn(7, 5, 3, 3, generator=gen(22), dtype=F64)
    factor = moment_whitening(moment, 0.0)
    svd = svd_exact(whiten(delta, factor), 4)
    up, down = split_factors(svd, 4)
    ref_up, ref_down, ref = whitened_factors(delta, torch.kron(channels, taps), 4, damping=0.0)
    torch.testing.assert_close(up @ unwhiten(down, factor), ref_up @ ref_down)
    torch.testing.assert_close(svd.s, ref.s)
    # damped: √damping on each factor, so the smallest eigenvalue of S Sᵀ is damping x the mean one (a Linear's)
    dense_s = moment_whitening(moment, DAMPING).apply(torch.eye(45, dtype=F64))
    eye5, eye9 = torch.eye(5, dtype=F64), torch.eye(9, dtype=F64)
    split = DAMPING**0.5
    damped = torch.kron(channels + split * torch.trace(channels) / 5 * eye5, taps + split * eye9)
    torch.testing.assert_close(dense_s @ dense_s.mT, damped)


def test_the_im2col_moment_is_indexed_like_to_matrix():
    """whitened_error with the unfolded patches' moment is the conv's real output error: channel-major c·9 + p."""
    x = torch.randn(4, 5, 6, 6, generator=gen(23), dtype=F64) * torch.logspace(0, -2, 5, dtype=F64)[:, None, None]
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 45)
    c = patches.mT @ patches / patches.shape[0]
    error = torch.randn(3, 5, 3, 3, generator=gen(24), dtype=F64)
    rms = math.sqrt(float(F.conv2d(x, error, padding=1).square().sum(1).mean()))
    zeros_up, zeros_down = torch.zeros(3, 1, dtype=F64), torch.zeros(1, 45, dtype=F64)
    assert whitened_error(error, zeros_up, zeros_down, c) == pytest.approx(rms, rel=1e-10)
