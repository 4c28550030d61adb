"""Does calibrated (activation-aware) extraction keep more of a finetune than plain SVD, on inputs it did not see?

    python -m benchmarks.bench_calibrate --quick         # trains a short tiny finetune first (about a minute)
    python -m benchmarks.bench_calibrate --run RUN       # an existing finetune run folder

Data: a tiny finetune (configs/finetune/tiny-cpu.yaml, the builtin tiny model on the builtin demo images; --steps
optimizer steps). Its images, shuffled with seed 0, are split in two halves: statistics for calibration are computed
on the first half (extract.calibrate.compute_calibration: base model, 4 timesteps per image), the measurement on
the second (held out) with the same pass.
For each rank (4, 8, 16) the plain and the calibrated LoRA are extracted (exact SVD, fp32 files), and measured:
  held-out error: sum over LoRA layers of ||(dW - dW_lora) C_B^1/2||^2 / sum ||dW C_B^1/2||^2, C_B the held-out
        input moments: the share of the finetune's effect on the layers' real outputs the LoRA misses
        (per component and total; 3x3 convs are not extracted here).
  kept effect: xlbake.evaluate.fidelity.measure_fidelity (UNet predictions on 8 noisy latents, prompts = the
        held-out captions): 1 - ||eps_lora - eps_tuned||^2 / ||eps_base - eps_tuned||^2.
Rule: calibration becomes a default only if it cuts the held-out error by >= 20 % at every rank.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from extract.calibrate import compute_calibration
from extract.config import ExtractConfig
from extract.pipeline import run_extract
from xlbake.data.run_images import read_run, run_items
from xlbake.evaluate.fidelity import measure_fidelity
from xlbake.fileio import save_safetensors_atomic
from xlbake.lora.io import read_lora
from xlbake.lora.lowrank import to_matrix
from xlbake.lora.names import kohya_targets
from xlbake.sdxl.checkpoint import open_checkpoint

RANKS = (4, 8, 16)
ROOT = Path(__file__).resolve().parent.parent


def train_run(folder: Path, steps: int) -> Path:
    """A short tiny finetune in ``folder`` (the demo config with max_steps)."""
    command = [sys.executable, "-m", "finetune", "--config", str(ROOT / "configs/finetune/tiny-cpu.yaml"),
               "--set", f"run_dir={folder}", "--set", f"train.max_steps={steps}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the tiny finetune failed:\n{done.stderr[-2000:]}")
    return folder


def held_out_errors(base: Path, tuned: Path, lora: Path, moments: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per component and total: sum ||(dW - dW_lora) C^1/2||^2 / sum ||dW C^1/2||^2 over the LoRA's layers."""
    modules = read_lora(lora).modules
    error: dict[str, float] = {}
    reference: dict[str, float] = {}
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for target in kohya_targets(b.shapes(), conv=False):
            if target.name not in modules or target.name not in moments:
                continue
            rows = slice(*target.rows) if target.rows else slice(None)
            delta = to_matrix(t.get(target.key).double() - b.get(target.key).double())[rows]
            module = modules[target.name]
            lora_delta = module.scale * to_matrix(module.up).double() @ to_matrix(module.down).double()
            c = moments[target.name].double()
            for key in (target.component, "total"):
                miss, ref = delta - lora_delta, delta
                error[key] = error.get(key, 0.0) + float(torch.einsum("oi,ij,oj->", miss, c, miss))
                reference[key] = reference.get(key, 0.0) + float(torch.einsum("oi,ij,oj->", ref, c, ref))
    return {key: error[key] / reference[key] for key in error if reference[key] > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing finetune run folder (default: train a short one)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of the finetune trained")
    parser.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks` (same run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        run = args.run or train_run(tmp / "run", args.steps)
        base, tuned = Path((run / "base.txt").read_text().strip()), run / "tuned.fp32.safetensors"
        data = read_run(run)
        items = run_items(data, seed=0)
        half = len(items) // 2
        cpu = torch.device("cpu")
        fit = compute_calibration(base, items[:half], data, components=None, seed=0, device=cpu)
        held = compute_calibration(base, items[half:], data, components=None, seed=1, device=cpu)
        calibration = save_safetensors_atomic(fit.moments, tmp / "fit.safetensors", fit.metadata)
        print(f"run {run}: {len(items)} images, calibrated on {half}, measured on {len(items) - half}")
        rows, loras = [], []
        for rank in RANKS:
            for label, options in (("plain", {}), ("calibrated", {"calibration": calibration})):
                out = tmp / f"{label}-{rank}.safetensors"
                cfg = ExtractConfig(base=base, tuned=tuned, out=out, dim=(rank,), svd="exact", save_precision="fp32",
                                    **options)  # fmt: skip
                run_extract(cfg, echo=lambda _: None)
                rows.append((rank, label, held_out_errors(base, tuned, out, held.moments)))
                loras.append(out)
        prompts = [item.caption for item in items[half:]]
        kept = [r.kept_effect for r in measure_fidelity(base, tuned, loras, prompts=prompts, n_samples=8)]
    print_table(rows, kept)
    return 0


def print_table(rows: list[tuple[int, str, dict[str, float]]], kept: list[float]) -> None:
    components = [key for key in ("unet", "te1", "te2", "total") if key in rows[0][2]]
    print("held-out activation-weighted error (share of the finetune's output change missed; lower is better)")
    print(f"{'rank':>4} {'method':<10} " + " ".join(f"{c:>8}" for c in components) + f" {'kept effect':>11}")
    for (rank, label, errors), effect in zip(rows, kept, strict=True):
        print(f"{rank:>4} {label:<10} " + " ".join(f"{errors[c]:8.4f}" for c in components) + f" {effect:11.4f}")
    for i in range(0, len(rows), 2):
        plain, calibrated = rows[i][2]["total"], rows[i + 1][2]["total"]
        share, rms = (1 - calibrated / plain, 1 - math.sqrt(calibrated / plain)) if plain > 0 else (0.0, 0.0)
        print(
            f"rank {rows[i][0]}: calibrated cuts the missed share by {100 * share:.1f} %"
            f" (RMS error by {100 * rms:.1f} %)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
