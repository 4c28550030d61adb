"""One step counter for the trainer, its planner and `xlbake dataset plan`: the sampler's batches, the guides' sums."""

import math

import pytest

from xlbake.data.steps import count_steps, steps_per_epoch


@pytest.mark.parametrize(
    ("images", "repeats", "epochs", "batch", "steps"),
    [  # the guides' tables: images x repeats x epochs / batch = steps
        (20, 10, 10, 2, 1000), (100, 3, 10, 2, 1500), (400, 1, 10, 2, 2000),
        (20, 2, 10, 2, 200), (40, 2, 7, 2, 280), (60, 2, 5, 2, 300), (100, 2, 4, 2, 400),
        (200, 2, 3, 2, 600), (600, 2, 2, 2, 1200), (200, 1, 17, 2, 1700), (300, 1, 12, 2, 1800),
        (100, 1, 8, 2, 400), (200, 1, 7, 2, 700), (300, 1, 5, 2, 750), (600, 1, 5, 2, 1500),
        (1000, 1, 10, 3, 3340),  # the guide rounds 3333 to 3300; sd-scripts rounds each epoch's 333.3 up to 334
    ],
)  # fmt: skip
def test_one_bucket_reproduces_the_guides_tables(images, repeats, epochs, batch, steps):
    assert count_steps([images * repeats], batch=batch, epochs=epochs).total_steps == steps


def test_one_bucket_is_sd_scripts_count_with_accumulation_and_gpus():
    """sd-scripts: ceil(ceil(T / (batch x gpus)) / accumulation) per epoch; batches are counted over all GPUs."""
    steps = count_steps([399], batch=1, grad_accum=3, processes=2, epochs=100)
    assert steps.steps_per_epoch == math.ceil(math.ceil(399 / 2) / 3) == 67
    assert (steps.samples_per_epoch, steps.batches_per_epoch, steps.total_steps) == (399, 399, 6700)


def test_each_bucket_ends_in_its_own_partial_batch_and_max_steps_caps():
    steps = count_steps([3, 5, 1], batch=2, grad_accum=2, processes=1, epochs=4)
    assert (steps.samples_per_epoch, steps.batches_per_epoch, steps.steps_per_epoch, steps.total_steps) == (9, 6, 3, 12)
    assert count_steps([3, 5, 1], batch=2, grad_accum=2, epochs=4, max_steps=5).total_steps == 5
    assert count_steps([3, 5, 1], batch=2, grad_accum=2, epochs=4, max_steps=50).total_steps == 12


def test_steps_per_epoch():
    assert steps_per_epoch(10, 3, 1) == 4
    assert steps_per_epoch(10, 1, 4) == 3
    assert steps_per_epoch(12, 3, 2) == 2


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch": 0}, {"grad_accum": 0}, {"processes": 0}, {"max_steps": -1}])
def test_impossible_settings_are_refused(bad):
    with pytest.raises(ValueError):
        count_steps([10], **{"batch": 1, **bad})
