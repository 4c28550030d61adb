"""benchmarks/bench_krylov.py's verdict: the fewest Krylov blocks meeting the accuracy rule on every difference."""

from types import SimpleNamespace

from benchmarks.bench_krylov import report, weighted


def row(blocks: dict[int, float]) -> dict:
    return {"blocks": blocks, "product_s": 0.01, "one_pass": 0.1, "fast_s": 0.05, "fast": 0.002, "kohya_s": 2.0}


def test_a_median_counts_each_class_as_often_as_it_has_layers():
    assert weighted([(0.001, 3), (0.05, 1)]) == (0.001, 0.05)
    assert weighted([(0.001, 1), (0.05, 3)]) == (0.05, 0.05)


def test_the_verdict_needs_the_median_and_the_worst_on_every_difference(capsys):
    layer = SimpleNamespace(shape=(8, 8))
    many, few = 30, 1
    rows = {
        "finetune": [(layer, many, row({1: 0.2, 2: 0.004, 3: 0.001})), (layer, few, row({1: 0.3, 2: 0.03, 3: 0.01}))],
        "slow-decay": [(layer, many, row({1: 0.2, 2: 0.003, 3: 0.001})), (layer, few, row({1: 0.2, 2: 0.01, 3: 0.01}))],
    }
    report(rows, dim=4)
    out = capsys.readouterr().out
    # at 2 blocks both medians pass, but finetune's worst (3 %) does not: 3 blocks
    assert "on every difference: 3;" in out
    rows["finetune"][1] = (layer, few, row({1: 0.3, 2: 0.015, 3: 0.01}))
    report(rows, dim=4)
    assert "on every difference: 2;" in capsys.readouterr().out
    # kohya's 2 s per layer over 31 layers, from the first difference only: 62 s, 40x needs 1.6 s
    assert "whole set: 62 CPU s" in out and "<= 1.6 s" in out
