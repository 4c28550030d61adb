"""Does calibrated (activation-aware) extraction keep more of a finetune than plain SVD, on data it did not see?

    python -m benchmarks.bench_calibrate --quick         # two short tiny finetunes first (a few minutes in all)
    python -m benchmarks.bench_calibrate --run RUN       # one existing finetune run folder instead

Concepts: tiny finetunes (configs/finetune/tiny-cpu.yaml, the builtin tiny model, --steps optimizer steps) on the
builtin demo images (the xlbk emblem) and on the second synthetic concept (xlbake.data.demo.make_style_dataset,
the qvst style). Each run's images are split by the one rule (xlbake.data.run_images.split_items): statistics for
calibration come from the calibration half (one pass of the base, 4 timesteps per image, seed 0, timed in a child
process), everything measured comes from the held-out half.
LoRAs (exact SVD, fp32 files, 3x3 convs extracted too at the same rank as conv_dim): plain and calibrated at ranks
4/8/16/32 (same ranks per layer, so the same file size), plain at 64 (for "calibrated at r vs plain at 2r"), and
both under two --size budgets (the parameter counts of the plain rank-8 and rank-16 files; dim 64 per layer).
Measured on the held-out half:
  act err: sum over Linear / 1x1 LoRA layers of ||(dW - dW_lora) C^1/2||^2 / sum ||dW C^1/2||^2, C the held-out
        input moments (other seed): the share of the layers' real output change the LoRA misses (3x3 convs, whose
        statistics are a Kronecker approximation, are left out of this column only).
  kept: xlbake.evaluate.fidelity kept effect on the held-out images (VAE latents noised at other timesteps and
        seeds, each with its own caption): 1 - ||eps_lora - eps_tuned||^2 / ||eps_base - eps_tuned||^2.
  ratio: (1 - kept calibrated) / (1 - kept plain), the kept-effect error ratio at equal file size; "vs 2r": the same
        with plain at twice the rank (twice the file).
Cost: CPU seconds and peak RSS of each child process (statistics pass; one extraction call writing ranks 4..64).
Goal (issue 15): ratio <= 0.8 at every size and never above 1, on both concepts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from extract.calibrate import compute_calibration
from xlbake.data.demo import make_style_dataset
from xlbake.data.run_images import read_run, run_items, split_items
from xlbake.evaluate.fidelity import measure_fidelity
from xlbake.evaluate.fidelity_inputs import dataset_inputs
from xlbake.lora.calibration import calibrated_targets, moment_for, statistics_bytes, write_calibration
from xlbake.lora.io import read_lora
from xlbake.lora.lowrank import to_matrix
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import open_checkpoint

RANKS = (4, 8, 16, 32)
EXTRACTED = (*RANKS, 64)
"""Ranks of the one extraction call per method (64: plain at twice the largest measured rank)."""
BUDGET_RANKS = (8, 16)
"""The --size budgets: the parameter counts of the plain files at these ranks."""
GOAL_RATIO = 0.8
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Cost:
    """What a child process took: CPU seconds (user + system) and peak RSS in MB."""

    cpu: float
    rss_mb: float


LAUNCHER = (
    "import os, subprocess, sys; child = subprocess.Popen(sys.argv[2:]); _, status, use = os.wait4(child.pid, 0); "
    "open(sys.argv[1], 'w').write(f'{use.ru_utime + use.ru_stime} {use.ru_maxrss}'); "
    "sys.exit(os.waitstatus_to_exitcode(status))"
)
"""Runs a command and writes its CPU seconds and peak RSS (KiB). Linux starts a child's peak RSS at its parent's
when it forks, so the measured command is forked from this small launcher, never from the benchmark (500+ MB)."""


def run_child(args: list[str], log: Path) -> Cost:
    """Run ``python args`` in the repository; its own CPU time and peak RSS, SystemExit if it fails."""
    usage = log.with_suffix(".usage")
    with log.open("w") as out:
        command = [sys.executable, "-c", LAUNCHER, str(usage), sys.executable, *args]
        done = subprocess.run(command, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed: python {' '.join(args)}\n{log.read_text()[-2000:]}")
    cpu, rss = usage.read_text().split()
    return Cost(float(cpu), int(rss) / 1024)


def train_run(folder: Path, steps: int, concept: str) -> Path:
    """A short tiny finetune of ``concept`` ("demo": the builtin demo images; "style": the second concept)."""
    command = ["-m", "finetune", "--config", str(ROOT / "configs/finetune/tiny-cpu.yaml"),
               "--set", f"run_dir={folder}", "--set", f"train.max_steps={steps}"]  # fmt: skip
    if concept == "style":
        data = make_style_dataset(folder.with_name(folder.name + "-data"), force=True)
        command += ["--set", f"data.roots=[{data}]", "--set", "sample.prompts=[a sun and a tree in qvst style]"]
    run_child(command, folder.with_name(folder.name + "-train.log"))
    return folder


def stats_pass(run: str, out: str, split: str, seed: str) -> None:
    """The statistics of ``split`` of the run's images into ``out`` (what ``extract --calibrate`` computes)."""
    run_path = Path(run)
    base = Path((run_path / "base.txt").read_text().strip())
    data = read_run(run_path)
    items = split_items(run_items(data, seed=0), split)
    found = compute_calibration(base, items, data, components=None, seed=int(seed), device=torch.device("cpu"))
    write_calibration(found, Path(out), force=True)


def extract_ranks(
    base: Path, tuned: Path, out: Path, calibration: Path | None, convs: bool
) -> tuple[dict[str, Path], Cost]:
    """{"r4": path, ...} for every rank of EXTRACTED from one extraction call, and its cost."""
    dims = ",".join(map(str, EXTRACTED))
    args = [*_extract_args(base, tuned, calibration, convs), "--out", str(out), "--dim", dims, "--conv-dim", dims]
    cost = run_child(args, out.with_suffix(".log"))
    return {f"r{r}": out.with_name(f"{out.stem}-dim{r}-conv{r}.safetensors") for r in EXTRACTED}, cost


def extract_budgets(
    base: Path, tuned: Path, out: Path, calibration: Path | None, convs: bool, budgets: list[int]
) -> dict:
    """{"b8": path, ...}: one LoRA per parameter budget (dim 64 per layer, the ranks chosen by --size)."""
    paths = {}
    for rank, budget in zip(BUDGET_RANKS, budgets, strict=True):
        path = out.with_name(f"{out.stem}-b{rank}.safetensors")
        args = [*_extract_args(base, tuned, calibration, convs), "--out", str(path), "--dim", "64", "--conv-dim", "64"]
        run_child([*args, "--size", str(budget)], path.with_suffix(".log"))
        paths[f"b{rank}"] = path
    return paths


def _extract_args(base: Path, tuned: Path, calibration: Path | None, convs: bool) -> list[str]:
    args = ["-m", "extract", "--base", str(base), "--tuned", str(tuned), "--svd", "exact", "--save-precision", "fp32"]
    convs_flag = ["--calibrate-convs"] if convs else []
    return args + (["--calibration", str(calibration), *convs_flag] if calibration else [])


def held_out_error(base: Path, tuned: Path, lora: Path, moments: dict[str, torch.Tensor]) -> float:
    """sum ||(dW - dW_lora) C^1/2||^2 / sum ||dW C^1/2||^2 over the LoRA's layers that have statistics."""
    modules = read_lora(lora).modules
    error = reference = 0.0
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for target in kohya_targets(b.shapes(), conv=False):
            if target.name not in modules or target.name not in moments:
                continue
            rows = slice(*target.rows) if target.rows else slice(None)
            delta = to_matrix(t.get(target.key).double() - b.get(target.key).double())[rows]
            module = modules[target.name]
            miss = delta - module.scale * to_matrix(module.up).double() @ to_matrix(module.down).double()
            c = moments[target.name].double()
            error += float(torch.einsum("oi,ij,oj->", miss, c, miss))
            reference += float(torch.einsum("oi,ij,oj->", delta, c, delta))
    return error / reference


def measure_concept(run: Path, tmp: Path, per_image: int, convs: bool) -> tuple[list[str], list[float]]:
    """The concept's table lines and its kept-effect error ratios (calibrated vs plain at equal size)."""
    base, tuned = Path((run / "base.txt").read_text().strip()), run / "tuned.fp32.safetensors"
    data = read_run(run)
    fit = tmp / "fit.safetensors"
    code = "import sys; from benchmarks.bench_calibrate import stats_pass; stats_pass(*sys.argv[1:])"
    stats = run_child(["-c", code, str(run), str(fit), "calibration", "0"], tmp / "stats.log")
    held_items = split_items(run_items(data, seed=0), "heldout")
    held_out = compute_calibration(base, held_items, data, components=None, seed=1, device=torch.device("cpu"))
    held = {name: moment_for(held_out, name) for name in held_out.modules}
    held = {name: moment.dense() for name, moment in held.items() if moment.taps is None}  # Linear / 1x1 only
    plain, plain_cost = extract_ranks(base, tuned, tmp / "plain.safetensors", None, convs)
    calibrated, cal_cost = extract_ranks(base, tuned, tmp / "cal.safetensors", fit, convs)
    budgets = [sum(m.params for m in read_lora(plain[f"r{r}"]).modules.values()) for r in BUDGET_RANKS]
    plain |= extract_budgets(base, tuned, tmp / "plain.safetensors", None, convs, budgets)
    calibrated |= extract_budgets(base, tuned, tmp / "cal.safetensors", fit, convs, budgets)
    inputs = dataset_inputs(base, run, split="heldout", per_image=per_image, seed=0)
    loras = [*plain.values(), *calibrated.values()]
    results = measure_fidelity(base, tuned, loras, inputs=inputs.groups)
    kept = {lora: result.kept_effect for lora, result in zip(loras, results, strict=True)}
    errors = {lora: held_out_error(base, tuned, lora, held) for lora in loras}
    lines = [f"statistics on {len(run_items(data, 0)) - len(held_items)} images, measured on {len(held_items)}"
             f" held-out images x {per_image} noise levels"]  # fmt: skip
    table, ratios = table_lines(plain, calibrated, budgets, kept, errors)
    lines += table
    lines.append(
        f"cost: statistics pass {stats.cpu:.1f} CPU s (peak RSS {stats.rss_mb:.0f} MB, file "
        f"{fit.stat().st_size / 1e6:.2f} MB); one extraction of ranks {'/'.join(map(str, EXTRACTED))}: plain "
        f"{plain_cost.cpu:.1f} CPU s (peak RSS {plain_cost.rss_mb:.0f} MB), calibrated {cal_cost.cpu:.1f} CPU s "
        f"({cal_cost.rss_mb:.0f} MB), {cal_cost.cpu / plain_cost.cpu:.2f}x"
    )
    return lines, ratios


def table_lines(
    plain: dict[str, Path], calibrated: dict[str, Path], budgets: list[int], kept: dict, errors: dict
) -> tuple[list[str], list[float]]:
    """One row per rank and budget: file size, held-out act err and kept effect of both, their ratios."""
    lines = [f"{'size':<14}{'MB':>7}{'act err plain':>15}{'calibrated':>11}{'kept plain':>12}{'calibrated':>11}"
             f"{'ratio':>8}{'kept plain 2r':>15}{'vs 2r':>7}"]  # fmt: skip
    ratios = []
    for label in [*(f"r{r}" for r in RANKS), *(f"b{r}" for r in BUDGET_RANKS)]:
        p, c, rank = plain[label], calibrated[label], int(label[1:])
        ratios.append((1 - kept[c]) / (1 - kept[p]))
        name = f"rank {rank}" if label[0] == "r" else f"{budgets[BUDGET_RANKS.index(rank)]} params"
        double = plain.get(f"r{2 * rank}") if label[0] == "r" else None
        versus = f"{kept[double]:15.4f}{(1 - kept[c]) / (1 - kept[double]):7.3f}" if double else ""
        lines.append(
            f"{name:<14}{c.stat().st_size / 1e6:7.3f}{errors[p]:15.4f}{errors[c]:11.4f}"
            f"{kept[p]:12.4f}{kept[c]:11.4f}{ratios[-1]:8.3f}{versus}"
        )
    return lines, ratios


def statistics_size_line() -> str:
    """The size of a calibration file for the real SDXL (from shapes only), against one dense moment per module."""
    from xlbake.sdxl.configs import real_sdxl_sgm_shapes

    shapes = real_sdxl_sgm_shapes()
    dense = 4 * sum(t.shape[1] ** 2 for t in calibrated_targets(shapes) if t.kind != "conv3x3")
    size = statistics_bytes(shapes) / 1e9
    return f"statistics for the real SDXL: {size:.2f} GB (format /1, a dense moment per module: {dense / 1e9:.1f} GB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="one existing finetune run folder (default: train both concepts)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of each finetune (24; 96 full)")
    parser.add_argument("--quick", action="store_true", help="24-step finetunes, 2 noise levels per held-out image")
    parser.add_argument("--calibrate-convs", action="store_true", help="also whiten the 3x3 convs (calibrate_convs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (24 if args.quick else 96)
    per_image = 2 if args.quick else 4
    verdicts = []
    print(statistics_size_line())
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        runs = {"run": args.run} if args.run else {c: tmp / c for c in ("demo", "style")}
        for concept, folder in runs.items():
            run = folder if args.run else train_run(folder, steps, concept)
            work = tmp / f"{concept}-work"
            work.mkdir()
            lines, ratios = measure_concept(run, work, per_image, args.calibrate_convs)
            print(f"\n== {concept}: {run if args.run else f'tiny finetune, {steps} steps'}")
            print("\n".join(lines))
            verdicts.append((concept, max(ratios)))
    met = all(worst <= GOAL_RATIO for _, worst in verdicts)
    never_worse = all(worst <= 1.0 for _, worst in verdicts)
    worst = ", ".join(f"{concept} {ratio:.3f}" for concept, ratio in verdicts)
    print(f"\nverdict: kept-effect error ratio <= {GOAL_RATIO} at every size: {'MET' if met else 'NOT MET'}; never "
          f"worse than plain: {'yes' if never_worse else 'NO'} (worst ratio: {worst})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
