"""Golden tests of the pure low-rank math on tiny fp64 tensors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from spectra import F64, gen, with_spectrum

from xlbake.errors import ConfigError, InputError
from xlbake.lora.factored import factor_svd
from xlbake.lora.lowrank import (
    Svd,
    all_finite,
    allocate_ranks,
    clamp_quantile,
    from_matrix,
    kept_energy,
    relative_error,
    reshape_factors,
    select_rank,
    split_factors,
    svd_exact,
    svd_randomized,
    to_matrix,
)


def rebuild(svd: Svd) -> torch.Tensor:
    return (svd.u * svd.s) @ svd.vh


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# --- reshapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_round_trip_through_matrix_and_locon_factors(kernel):
    out_ch, in_ch, rank = 6, 4, 3
    up0 = torch.randn(out_ch, rank, generator=gen(1), dtype=F64)
    down0 = torch.randn(rank, in_ch * kernel * kernel, generator=gen(2), dtype=F64)
    weight = from_matrix(up0 @ down0, (out_ch, in_ch, kernel, kernel))
    assert to_matrix(weight).shape == (out_ch, in_ch * kernel * kernel)
    assert torch.equal(from_matrix(to_matrix(weight), weight.shape), weight)

    up, down = reshape_factors(*split_factors(svd_exact(to_matrix(weight), rank), rank), weight.shape)
    assert up.shape == (out_ch, rank, 1, 1) and down.shape == (rank, in_ch, kernel, kernel)
    x = torch.randn(2, in_ch, 7, 7, generator=gen(3), dtype=F64)
    lora_out = F.conv2d(F.conv2d(x, down, padding=kernel // 2), up)
    torch.testing.assert_close(lora_out, F.conv2d(x, weight, padding=kernel // 2), rtol=1e-10, atol=1e-10)
    assert torch.equal(to_matrix(up), up.reshape(out_ch, rank))


def test_linear_shapes_unchanged_and_bad_shapes_refused():
    w = torch.randn(5, 3, dtype=F64)
    assert to_matrix(w) is w
    up, down = torch.ones(5, 2), torch.ones(2, 3)
    assert reshape_factors(up, down, (5, 3)) == (up, down)
    with pytest.raises(InputError, match="shape"):
        to_matrix(torch.ones(2, 3, 4))
    with pytest.raises(InputError, match="matrix"):
        svd_exact(torch.ones(2, 3, 4, 5), 1)


# --- truncated SVDs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
@pytest.mark.parametrize("method", [svd_exact, svd_randomized])
def test_exact_rank_r_matrix_is_recovered_at_rank_r(shape, method):
    s = torch.tensor([5.0, 3.0, 2.0, 0.5], dtype=F64)
    m = with_spectrum(*shape, s)
    svd = method(m, 4, oversample=2) if method is svd_randomized else method(m, 4)
    assert svd.u.shape == (shape[0], 4) and svd.s.shape == (4,) and svd.vh.shape == (4, shape[1])
    assert svd.s.dtype == F64
    torch.testing.assert_close(svd.s, s, rtol=1e-10, atol=0)
    assert rel(rebuild(svd), m) < 1e-12
    up, down = split_factors(svd, 4)
    assert rel(up @ down, m) < 1e-12
    torch.testing.assert_close(svd.u.T @ svd.u, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(svd.vh @ svd.vh.T, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(30, 18), (18, 30)])
def test_truncation_error_is_eckart_young(shape):
    m = torch.randn(*shape, generator=gen(4), dtype=F64)
    full = torch.linalg.svdvals(m)
    for rank in (1, 5, 17):
        svd = svd_exact(m, rank)
        torch.testing.assert_close(svd.s, full[:rank], rtol=1e-12, atol=0)
        error = float(torch.linalg.norm(m - rebuild(svd)))
        assert error == pytest.approx(float(full[rank:].square().sum().sqrt()), rel=1e-10)
        assert error / float(torch.linalg.norm(m)) == pytest.approx(relative_error(full, rank), rel=1e-10)
        assert kept_energy(full, rank) == pytest.approx(1 - relative_error(full, rank) ** 2, rel=1e-12)


def test_rank_above_min_dimension_returns_every_triplet():
    m = torch.randn(7, 4, generator=gen(5), dtype=F64)
    for method in (svd_exact, svd_randomized):
        svd = method(m, 10)
        assert svd.s.shape == (4,)
        assert rel(rebuild(svd), m) < 1e-12
        up, down = split_factors(svd, 10)
        assert up.shape == (7, 4) and down.shape == (4, 4)
    with pytest.raises(ConfigError, match="rank"):
        svd_exact(m, 0)


def test_randomized_with_two_power_iterations_is_within_one_percent_of_exact():
    i = torch.arange(300, dtype=F64)
    m = with_spectrum(500, 300, 1.0 / (1.0 + i), seed=6)  # slowly decaying: hard for a randomized method
    rank = 32
    optimum = float(torch.linalg.norm(m - rebuild(svd_exact(m, rank))))
    errors = {p: float(torch.linalg.norm(m - rebuild(svd_randomized(m, rank, power_iters=p)))) for p in (0, 2)}
    assert errors[2] <= 1.01 * optimum
    assert errors[0] > 1.05 * optimum  # the power iterations are what buys that accuracy


def test_randomized_is_reproducible_per_seed():
    m = with_spectrum(80, 60, torch.linspace(10, 1, 40, dtype=F64), seed=7)
    a, b = svd_randomized(m, 5, seed=3), svd_randomized(m, 5, seed=3)
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.vh, b.vh)
    assert not torch.equal(a.s, svd_randomized(m, 5, seed=4).s)


def test_zero_matrix_gives_zero_spectrum():
    m = torch.zeros(12, 9, dtype=F64)
    for method in (svd_exact, svd_randomized):
        svd = method(m, 2)
        assert torch.equal(svd.s, torch.zeros(2, dtype=F64))
        assert torch.equal(rebuild(svd), m)
    assert kept_energy(torch.zeros(3), 1) == 1.0 and relative_error(torch.zeros(3), 1) == 0.0
    assert select_rank(torch.zeros(3), "sv_fro", 0.9, 3) == 1


# --- factor-space SVD (resize) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "rank", "cols"), [(20, 6, 15), (4, 6, 15), (20, 6, 3), (3, 8, 2)])
def test_factor_svd_equals_svd_of_the_product(rows, rank, cols):
    up = torch.randn(rows, rank, generator=gen(8), dtype=F64)
    down = torch.randn(rank, cols, generator=gen(9), dtype=F64)
    product = up @ down
    svd = factor_svd(up, down)
    k = min(rows, rank, cols)
    assert svd.s.shape == (k,)
    torch.testing.assert_close(svd.s, torch.linalg.svdvals(product)[:k], rtol=1e-10, atol=0)
    assert rel(rebuild(svd), product) < 1e-12  # resize to rank >= the old one preserves the delta
    new_up, new_down = split_factors(svd, rank + 3)
    assert rel(new_up @ new_down, product) < 1e-12
    small = svd_exact(product, 2)
    assert rel(rebuild(Svd(svd.u[:, :2], svd.s[:2], svd.vh[:2])), rebuild(small)) < 1e-10


def test_factor_svd_of_locon_factors_and_zero_factors():
    up = torch.randn(6, 3, 1, 1, generator=gen(10), dtype=F64)
    down = torch.randn(3, 4, 3, 3, generator=gen(11), dtype=F64)
    svd = factor_svd(up, down)
    assert svd.vh.shape == (3, 36)
    assert rel(rebuild(svd), to_matrix(up) @ to_matrix(down)) < 1e-12
    zero = factor_svd(torch.zeros(6, 3, dtype=F64), torch.zeros(3, 5, dtype=F64))
    assert torch.equal(zero.s, torch.zeros(3, dtype=F64))
    assert torch.equal(rebuild(zero), torch.zeros(6, 5, dtype=F64))
    with pytest.raises(InputError, match="do not match"):
        factor_svd(torch.ones(6, 3), torch.ones(2, 5))


# --- rank selection ---------------------------------------------------------------------------------------------

GOLDEN = [
    ([10, 1, 1, 1], "sv_ratio", 5, 4, 1),  # kohya's resize keeps 2 here
    ([10, 5, 1, 0.5, 0.1], "sv_ratio", 4, 5, 2),
    ([10, 5, 1, 0.5, 0.1], "sv_fro", 0.9, 5, 2),
    ([10, 5, 1, 0.5, 0.1], "sv_cumulative", 0.6, 5, 1),
    ([10, 5, 1, 0.5, 0.1], "sv_ratio", 1000, 5, 5),
    ([10, 5, 1, 0.5, 0.1], "sv_ratio", 1000, 3, 3),  # capped by max_rank
    ([10, 5, 1, 0.5, 0.1], "sv_ratio", 2, 5, 1),  # σ_max / σ_2 == 2 exactly: discarding it meets the ratio
    ([10, 5, 1, 0.5, 0.1], "sv_ratio", 1, 5, 1),
    ([10, 5, 1, 0.5, 0.1], "sv_fro", 1.0, 5, 5),
    ([10, 5, 1, 0.5, 0.1], "sv_cumulative", 0.9, 5, 2),
    ([1, 1, 1, 1], "sv_cumulative", 0.5, 4, 2),  # met exactly at 2
    ([1, 1, 1, 1], "sv_fro", 0.5, 4, 1),  # sqrt(1/4) = 0.5
    ([10, 5, 1], "fixed", 0, 2, 2),
    ([10, 5, 1], "fixed", 0, 8, 3),  # never more than the spectrum holds
]


@pytest.mark.parametrize(("s", "method", "value", "max_rank", "expected"), GOLDEN)
def test_select_rank_golden(s, method, value, max_rank, expected):
    assert select_rank(torch.tensor(s, dtype=torch.float32), method, value, max_rank) == expected


def test_select_rank_is_minimal_against_its_criterion():
    s = torch.tensor([9.0, 7.0, 4.0, 3.0, 1.0, 0.2], dtype=F64)
    for target in torch.linspace(0.05, 1.0, 40).tolist():
        rank = select_rank(s, "sv_fro", target, 6)
        assert math.sqrt(kept_energy(s, rank)) >= target - 1e-9
        assert rank == 1 or math.sqrt(kept_energy(s, rank - 1)) < target
        rank = select_rank(s, "sv_cumulative", target, 6)
        assert float(s[:rank].sum() / s.sum()) >= target - 1e-9
        assert rank == 1 or float(s[: rank - 1].sum() / s.sum()) < target


@pytest.mark.parametrize(
    ("method", "value", "max_rank", "match"),
    [("svd", 1, 4, "unknown rank method"), ("sv_ratio", 0.5, 4, "sv_ratio"), ("sv_fro", 1.5, 4, "sv_fro"),
     ("sv_cumulative", 0, 4, "sv_cumulative"), ("fixed", 0, 0, "max rank")],
)  # fmt: skip
def test_select_rank_refuses_bad_settings(method, value, max_rank, match):
    with pytest.raises(ConfigError, match=match):
        select_rank(torch.ones(4), method, value, max_rank)


# --- global rank allocation -------------------------------------------------------------------------------------


def energy_of(spectra, ranks) -> float:
    return sum(float(s[:r].double().square().sum()) for s, r in zip(spectra, ranks, strict=True))


def cost_of(costs, ranks) -> int:
    return sum(c * r for c, r in zip(costs, ranks, strict=True))


def brute_force(spectra, costs, max_ranks):
    """The best energy within a budget, by enumerating every allocation: budget -> optimum."""
    allocations = [
        (cost_of(costs, ranks), energy_of(spectra, ranks))
        for ranks in itertools.product(*(range(min(m, len(s)) + 1) for s, m in zip(spectra, max_ranks, strict=True)))
    ]
    return lambda budget: max(energy for cost, energy in allocations if cost <= budget)


def random_case(seed: int, layers: int = 4, max_rank: int = 4):
    g = gen(seed)
    spectra = [
        torch.sort(torch.rand(max_rank, generator=g, dtype=F64) * 10, descending=True).values for _ in range(layers)
    ]
    costs = torch.randint(3, 30, (layers,), generator=g).tolist()
    max_ranks = torch.randint(0, max_rank + 1, (layers,), generator=g).tolist()
    return spectra, costs, max_ranks


def greedy_prefix_costs(spectra, costs, max_ranks) -> list[int]:
    """Total costs at which the σ²/cost greedy has bought exactly a prefix of its candidates."""
    candidates = [
        (float(s[j]) ** 2 / c, c)
        for s, c, m in zip(spectra, costs, max_ranks, strict=True)
        for j in range(min(m, len(s)))
    ]
    ordered = sorted(candidates, key=lambda item: -item[0])
    return list(itertools.accumulate(c for _, c in ordered))


@pytest.mark.parametrize("seed", range(12))
def test_allocate_ranks_against_brute_force(seed):
    spectra, costs, max_ranks = random_case(seed)
    optimum = brute_force(spectra, costs, max_ranks)
    total = cost_of(costs, max_ranks)
    for budget in range(0, total + 2, 7):
        ranks = allocate_ranks(spectra, costs, budget, max_ranks)
        assert cost_of(costs, ranks) <= budget
        assert all(0 <= r <= m for r, m in zip(ranks, max_ranks, strict=True))
        best_gain = max((float(s[0]) ** 2 for s in spectra), default=0.0)
        assert energy_of(spectra, ranks) >= optimum(budget) - best_gain - 1e-9
    for budget in greedy_prefix_costs(spectra, costs, max_ranks):  # where greedy stops cleanly it is optimal
        ranks = allocate_ranks(spectra, costs, budget, max_ranks)
        assert energy_of(spectra, ranks) == pytest.approx(optimum(budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_allocate_ranks_is_optimal_for_equal_costs(seed):
    spectra, _, max_ranks = random_case(seed)
    costs = [5] * len(spectra)
    optimum = brute_force(spectra, costs, max_ranks)
    for budget in range(0, 5 * sum(max_ranks) + 3):
        ranks = allocate_ranks(spectra, costs, budget, max_ranks)
        assert energy_of(spectra, ranks) == pytest.approx(optimum(budget), abs=1e-9)


def test_allocate_ranks_beats_the_best_uniform_rank_of_the_same_cost():
    g = gen(12)
    layers = 60
    scales = torch.rand(layers, generator=g, dtype=F64).tolist()
    spectra = [torch.sort(torch.rand(32, generator=g, dtype=F64) ** 3 * s, descending=True).values for s in scales]
    costs = torch.randint(16, 400, (layers,), generator=g).tolist()
    max_ranks = [32] * layers
    for uniform in (1, 2, 4, 8, 16, 32):
        budget = cost_of(costs, [uniform] * layers)
        ranks = allocate_ranks(spectra, costs, budget, max_ranks)
        assert cost_of(costs, ranks) <= budget
        assert energy_of(spectra, ranks) >= energy_of(spectra, [uniform] * layers)
        if uniform < 32:
            assert energy_of(spectra, ranks) > energy_of(spectra, [uniform] * layers)


def test_allocate_ranks_falls_back_to_uniform_when_the_budget_edge_cuts_a_dear_layer():
    # greedy by density buys the cheap layer's two units first and then cannot afford the dear one
    spectra = [torch.tensor([10.0]), torch.tensor([math.sqrt(11.0), math.sqrt(10.5)])]
    costs, budget = [10, 1], 11
    ranks = allocate_ranks(spectra, costs, budget, [1, 2])
    assert ranks == [1, 1]
    assert energy_of(spectra, ranks) == pytest.approx(brute_force(spectra, costs, [1, 2])(budget))


def test_allocate_ranks_skips_layers_that_do_not_pay():
    spectra = [torch.zeros(4), torch.tensor([3.0, 2.0, 0.0]), torch.tensor([5.0, 1.0])]
    assert allocate_ranks(spectra, [1, 1, 1], 100, [4, 3, 0]) == [0, 2, 0]
    assert allocate_ranks(spectra, [1, 1, 1], 0, [4, 3, 2]) == [0, 0, 0]
    assert allocate_ranks([], [], 10, []) == []
    with pytest.raises(ConfigError, match="one cost"):
        allocate_ranks(spectra, [1], 10, [1, 1, 1])
    with pytest.raises(ConfigError, match="budget"):
        allocate_ranks(spectra, [1, 0, 1], 10, [1, 1, 1])


def test_allocate_ranks_scales_to_many_layers():
    g = gen(13)
    spectra = [torch.sort(torch.rand(256, generator=g), descending=True).values for _ in range(400)]
    costs = torch.randint(1000, 25000, (400,), generator=g).tolist()
    budget = 20_000_000
    ranks = allocate_ranks(spectra, costs, budget, [256] * 400)
    spent = cost_of(costs, ranks)
    assert spent <= budget and budget - spent < max(costs)  # nothing that fits is left unbought
    assert max(ranks) <= 256 and len(set(ranks)) > 1


# --- energy and clamping ----------------------------------------------------------------------------------------


def test_kept_energy_values():
    s = torch.tensor([3.0, 4.0])
    assert kept_energy(s, 0) == 0.0
    assert kept_energy(s, 1) == pytest.approx(9 / 25)
    assert kept_energy(s, 2) == 1.0
    assert relative_error(s, 1) == pytest.approx(4 / 5)


def test_clamp_quantile_matches_kohya():
    up = torch.randn(40, 4, generator=gen(14), dtype=F64)
    down = torch.randn(4, 30, generator=gen(15), dtype=F64) * 3
    for q in (0.99, 0.9, 0.75):
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), q)  # kohya's computation
        new_up, new_down = clamp_quantile(up, down, q)
        assert torch.equal(new_up, up.clamp(-high, high)) and torch.equal(new_down, down.clamp(-high, high))
        assert new_up.shape == up.shape and not torch.equal(new_down, down)
    assert clamp_quantile(up, down, 1.0) == (up, down)
    with pytest.raises(ConfigError, match="clamp quantile"):
        clamp_quantile(up, down, 0.4)


def test_clamp_quantile_beyond_torch_quantile_size_limit():
    n = 2**24 + 1  # torch.quantile refuses inputs this large
    values = torch.arange(n, dtype=torch.float32)
    up, down = values[:-1].reshape(-1, 1), values[-1:].reshape(1, 1)
    new_up, new_down = clamp_quantile(up, down, 0.9)
    high = 0.9 * (n - 1)  # quantile of 0..n-1 by linear interpolation
    assert float(new_up.max()) == pytest.approx(high, rel=1e-6)
    assert float(new_down) == pytest.approx(high, rel=1e-6)
    assert torch.equal(new_up[:100], up[:100])


def test_factor_svd_keeps_only_the_top_vectors_asked_for_with_every_singular_value():
    g = gen(12)
    decay = torch.exp(-torch.arange(40, dtype=torch.float32) / 6)  # a trained LoRA's steep spectrum: cond ~ 800
    up, down = torch.randn(90, 40, generator=g), torch.randn(40, 150, generator=g) * decay[:, None]
    svd = factor_svd(up, down, keep=5)
    reference = torch.linalg.svd(up.double() @ down.double(), full_matrices=False)
    assert svd.u.shape == (90, 5) and svd.vh.shape == (5, 150) and svd.s.shape == (40,)
    assert float((svd.s.double() - reference.S[:40]).abs().max()) <= 1e-5 * float(reference.S[0])
    top = (reference.U[:, :5] * reference.S[:5]) @ reference.Vh[:5]
    assert rel((svd.u.double() * svd.s[:5].double()) @ svd.vh.double(), top) <= 1e-5
    assert torch.allclose(svd.u.T @ svd.u, torch.eye(5), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_sees_nan_and_both_infinities_anywhere(dtype):
    x = torch.randn(7, 5).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[4, 2] = bad
        assert not all_finite(y), bad
