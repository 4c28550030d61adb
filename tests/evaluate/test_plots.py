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


def text_boxes(figure):
    """Window extents of every visible, non-empty text of ``figure`` (legends as one box), after layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    legends = figure.findobj(Legend)
    skip = {id(t) for legend in legends for t in legend.get_texts()}
    for axis in (a for axes in figure.axes for a in (axes.xaxis, axes.yaxis)):
        low, high = sorted(axis.get_view_interval())
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if not low - 1e-9 * abs(low) <= tick.get_loc() <= high + 1e-9 * abs(high):  # not drawn
                skip |= {id(tick.label1), id(tick.label2)}
    texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in skip]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    boxes += [(f"legend {i}", legend.get_window_extent(renderer)) for i, legend in enumerate(legends)]
    return boxes, figure.bbox


def crowded_results(tmp_path):
    """LoRAs a MB apart keeping about the same, same-rank files named by their long stems, one far right."""

    def result(name, ranks, mb, effect):
        return FidelityResult(tmp_path / f"{name}.safetensors", *ranks, int(mb * 2.5e5), mb, effect, effect, 0.1, 1.0)

    return [
        result("lora-dim8", (8, 8), 7.0, 0.40),
        result("lora-dim64-rank16-sv_fro-0.9", (4, 16), 28.0, 0.80),
        result("lora-dim64-rank16-sv_ratio-20", (4, 16), 29.0, 0.81),
        result("lora-dim64-rank16", (16, 16), 30.0, 0.82),
        result("lora-dim128-rank128-conv-everything", (128, 128), 220.0, 0.995),
    ]


def test_kept_effect_labels_are_inside_the_figure_and_do_not_overlap(tmp_path):
    from xlbake.evaluate.plots import kept_effect_figure

    boxes, page = text_boxes(kept_effect_figure(crowded_results(tmp_path), "what each LoRA keeps of tuned"))
    names = [name for name, _ in boxes]
    assert "rank 8" in names and "lora-dim64-rank16-sv_fro-0.9" in names and "rank 128" in names
    for name, box in boxes:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, name
    for i, (name, box) in enumerate(boxes):
        for other, other_box in boxes[i + 1 :]:
            assert not box.overlaps(other_box), (name, other)


def test_identical_learning_rates_share_one_line_and_different_ones_are_told_apart(tmp_path):
    from xlbake.evaluate.plots import loss_figure

    steps = tuple(range(1, 51))
    same = Series(steps, (1e-6,) * 50)
    lrs = {"unet": Series(steps, tuple(2e-6 * s / 50 for s in steps)), "te1": same, "te2": same, "vae": same}
    figure = loss_figure(LossLog(Series(steps, (1.0,) * 50), lrs, tmp_path), title="t")
    lr_axis = figure.axes[-1]
    styles = [(line.get_linestyle(), line.get_marker()) for line in lr_axis.get_lines()]
    labels = [line.get_label() for line in lr_axis.get_lines()]
    assert len(styles) == 2 and len(set(styles)) == 2  # te1 = te2 = vae drawn once: nothing hides under another
    assert any("te1" in label and "te2" in label and "vae" in label for label in labels)
    boxes, page = text_boxes(figure)
    for name, box in boxes:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, name


def test_the_finetune_loss_plot_is_the_loss_curve_plot(tmp_path):
    """One loss-plot style: the trainer's RUN/loss.png is plot_loss_curve of its own loss history."""
    from finetune.outputs import write_loss_plot

    losses, lrs = [1.0 / s for s in range(1, 31)], [1e-4] * 30
    losses[4] = float("nan")  # a skipped step
    run = tmp_path / "myrun"
    run.mkdir()
    written = write_loss_plot(losses, lrs, run / "loss.png")
    log = LossLog(
        Series(tuple(s for s in range(1, 31) if s != 5), tuple(v for i, v in enumerate(losses) if i != 4)),
        {"lr": Series(tuple(range(1, 31)), tuple(lrs))},
        run,
    )
    expected = plot_loss_curve(log, tmp_path / "expected.png", title="training loss: myrun", force=False)
    np.testing.assert_array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(expected)))
    assert write_loss_plot([float("nan")], [], run / "none.png") is None
