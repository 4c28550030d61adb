"""LoRA size budgets and rank choice, shared by extract and resize: one size parser, one rank allocator."""

import pytest
import torch

from xlbake.errors import ConfigError
from xlbake.lora.budget import LayerChoice, budget_ranks, choose_ranks, criterion_ranks, parse_size, total_kept


@pytest.mark.parametrize(
    ("text", "amount", "unit"),
    [
        ("100MB", 100_000_000, "bytes"),  # LoRA file sizes are decimal, as download pages show them
        ("1.5GB", 1_500_000_000, "bytes"),
        ("64MiB", 64 * 2**20, "bytes"),
        ("800KiB", 819_200, "bytes"),
        ("100 mb", 100_000_000, "bytes"),
        ("50M", 50_000_000, "params"),  # a bare count is parameters
        ("12500000", 12_500_000, "params"),
        ("1.5e3", 1500, "params"),
        ("20M params", 20_000_000, "params"),
        ("20Mparams", 20_000_000, "params"),
        ("1000param", 1000, "params"),
    ],
)
def test_every_spelling_extract_or_resize_accepted(text, amount, unit):
    budget = parse_size(text)
    assert (budget.amount, budget.unit) == (amount, unit)


def test_budget_label_is_the_text_without_spaces():
    assert parse_size(" 20M params ").text == "20M params"
    assert parse_size("20M params").label == "20Mparams"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100 parsecs", "unknown unit 'parsecs'"),
        ("50 parsecs", "expected a file size"),
        ("5ib", "unknown unit 'ib'"),
        ("2MB params", "unknown unit 'MB params'"),
        ("MB", "cannot read"),
        ("-3MB", "cannot read"),
        ("0", "not a positive size"),
        ("0.5 params", "not a positive size"),
    ],
)
def test_bad_sizes_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def _layers() -> list[LayerChoice]:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for scale, cost, floor in [(10, 100, 0), (1, 40, 1), (3, 300, 0), (0.1, 40, 1)]:
        spectrum = torch.sort(torch.rand(8, generator=gen) * scale, descending=True).values
        layers.append(LayerChoice(spectrum, float(spectrum.square().sum()), cost, 8, floor))
    return layers


def test_budget_ranks_respect_floors_and_beat_uniform():
    layers = _layers()
    for budget in (80, 500, 1500, 4000):
        ranks = budget_ranks(layers, budget)
        assert sum(r * x.cost for r, x in zip(ranks, layers, strict=True)) <= budget
        assert all(r >= x.floor for r, x in zip(ranks, layers, strict=True))
        for uniform in range(1, 9):
            if sum(max(uniform, x.floor) * x.cost for x in layers) <= budget:
                assert total_kept(layers, ranks) >= total_kept(layers, [max(uniform, x.floor) for x in layers])
    with pytest.raises(ConfigError, match="text-encoder"):
        budget_ranks(layers, 79)


def test_choose_ranks_picks_budget_then_criterion_then_fixed():
    layers = _layers()
    assert choose_ranks(layers, "fixed", None, 500) == budget_ranks(layers, 500)
    assert choose_ranks(layers, "sv_fro", 0.9, None) == criterion_ranks(layers, "sv_fro", 0.9)
    assert choose_ranks(layers, "fixed", None, None) == [8, 8, 8, 8]


def test_sv_fro_counts_the_energy_beyond_the_known_singular_values():
    spectrum = torch.tensor([3.0, 2.0, 1.0])
    known_only = LayerChoice(spectrum, 14.0, 10, 3, full=True)
    with_tail = LayerChoice(spectrum, 14.0 + 86.0, 10, 3)  # the rest of the spectrum holds 86 of the energy
    assert [criterion_ranks([known_only], "sv_fro", v)[0] for v in (0.97, 0.9, 0.8)] == [3, 2, 1]
    assert criterion_ranks([known_only], "sv_fro", 0.35) == [1]
    assert criterion_ranks([with_tail], "sv_fro", 0.35) == [2], "rank 2 keeps sqrt(13 / 100) = 0.36 of the norm"
    assert criterion_ranks([with_tail], "sv_fro", 0.5) == [3], "even rank 3 keeps only 0.37: the cap"
