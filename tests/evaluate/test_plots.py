"""Plots: the loss log is read from what the trainer writes (tensorboard via accelerate, trainer_state.json) or a
JSONL log, and every figure is a real, non-blank PNG."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from xlbake.errors import InputError, OutputError
from xlbake.evaluate.fidelity import FidelityResult
from xlbake.evaluate.plots import LossLog, Series, plot_kept_effect, plot_loss_curve, read_loss_log, smooth


def assert_real_png(path: Path, size: tuple[int, int]) -> None:
    image = Image.open(path)
    assert image.format == "PNG" and image.size == size
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    assert (gray < 100).mean() > 0.005  # lines, text and axes, not a blank page


def log_with_accelerate(logs: Path, steps: range, loss, lr) -> None:
    """What the trainer does: accelerate's tensorboard tracker in RUN/logs, run name "finetune"."""
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker("finetune", logs)
    tracker.start()
    tracker.store_init_configuration({"optim.lr": 1e-4, "train.epochs": 2})
    for step in steps:
        tracker.log({"loss": loss(step), "lr/unet": lr(step), "lr/te1": lr(step) / 2}, step=step)
    tracker.finish()


def test_tensorboard_logs_of_a_resumed_run_are_read_with_the_later_values(tmp_path):
    run = tmp_path / "run"
    log_with_accelerate(run / "logs", range(1, 21), lambda s: 1.0 / s, lambda s: 1e-4 * s / 20)
    time.sleep(0.01)  # the resumed run logs later: its steps 15.. replace the first run's
    log_with_accelerate(run / "logs", range(15, 31), lambda s: 2.0 / s, lambda s: 1e-4)
    log = read_loss_log(run)
    assert log.loss.steps == tuple(range(1, 31))
    assert log.loss.values[:14] == pytest.approx([1.0 / s for s in range(1, 15)])
    assert log.loss.values[14:] == pytest.approx([2.0 / s for s in range(15, 31)])
    assert sorted(log.lrs) == ["te1", "unet"]
    assert log.lrs["unet"].values[0] == pytest.approx(5e-6) and log.lrs["te1"].values[-1] == pytest.approx(5e-5)
    out = plot_loss_curve(log, tmp_path / "loss.png", force=False)
    assert_real_png(out, (1080, 576))
    with pytest.raises(OutputError):
        plot_loss_curve(log, out, force=False)


def test_without_tensorboard_the_newest_training_state_is_read(tmp_path):
    for step, scale in ((10, 1.0), (20, 3.0)):
        folder = tmp_path / "state" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        state = {"global_step": step, "losses": [scale / (i + 1) for i in range(step)], "lrs": [1e-5] * step}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    log = read_loss_log(tmp_path)
    assert log.loss.steps == tuple(range(1, 21)) and log.loss.values[0] == 3.0
    assert log.lrs["lr"].values == (1e-5,) * 20


def test_jsonl_logs_skip_non_finite_losses_and_name_bad_lines(tmp_path):
    lines = [{"step": s, "loss": float("nan") if s == 3 else 1.0 / s, "lr": 1e-4} for s in range(1, 6)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    log = read_loss_log(path)
    assert log.loss.steps == (1, 2, 4, 5) and log.lrs["lr"].steps == (1, 2, 3, 4, 5)
    path.write_text(json.dumps(lines[0]) + "\nnot json\n")
    with pytest.raises(InputError, match="train.jsonl:2"):
        read_loss_log(path)


def test_a_folder_without_logs_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no tensorboard events"):
        read_loss_log(tmp_path)
    (tmp_path / "nan.jsonl").write_text(json.dumps({"step": 1, "loss": math.inf}) + "\n")
    with pytest.raises(InputError, match="no finite loss"):
        read_loss_log(tmp_path / "nan.jsonl")


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards zero at the start
    assert smooth([0.0, 1.0], factor=0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_loss_plot_command_writes_beside_the_run(tmp_path):
    from xlbake.evaluate.cli import loss_plot

    log_with_accelerate(tmp_path / "logs", range(1, 6), lambda s: 1.0 / s, lambda s: 1e-4)
    result = CliRunner().invoke(loss_plot, [str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert_real_png(tmp_path / "loss-curve.png", (1080, 576))


def test_kept_effect_plot_is_a_real_png(tmp_path):
    results = [
        FidelityResult(tmp_path / f"lora-dim{r}.safetensors", r, r, 1000 * r, 0.5 * r, 1 - 0.5**r, 1 - 0.6**r, 0.1, 1.0)
        for r in (4, 1, 2, 8)
    ]
    assert_real_png(plot_kept_effect(results, tmp_path / "kept.png"), (960, 600))
    with pytest.raises(ValueError):
        plot_kept_effect([], tmp_path / "empty.png")


def test_loss_plot_needs_no_learning_rate(tmp_path):
    log = LossLog(Series((1, 2, 3), (1.0, 0.5, 0.7)), {}, tmp_path)
    assert_real_png(plot_loss_curve(log, tmp_path / "l.png", force=False), (1080, 576))
