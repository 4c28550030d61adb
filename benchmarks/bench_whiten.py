"""What do input statistics cost extraction, and what does their compression lose?

    python -m benchmarks.bench_whiten [--quick]

Per SDXL-shaped layer (one difference (out, in) with a decaying spectrum, one input moment C with eigenvalues ~ 1/i
and 3 outlier directions 100x the top, like real activations), CPU seconds at 1 thread (process_time, best of 2):
  plain       extract's factor_layer without statistics (fast SVD, rank 128)
  calibrated  factor_layer with C compressed as a calibration file stores it (xlbake.lora.moments: top-128
              eigenpairs + isotropic remainder; whitening applied in factored form)
  dense       the earlier path for reference: Cholesky of the dense C, ΔW S by a full GEMM, triangular solve
and the output error each LoRA leaves on inputs of moment C, ||(dW - BA) C^1/2|| / ||dW C^1/2||: plain, with the
compressed metric, with the dense one (the whitened optimum). Goal: calibrated <= 1.5x plain in total.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from extract.config import ExtractConfig
from extract.layers import FactorSettings, factor_layer, truncated_svd
from xlbake.lora.calibration import Calibration
from xlbake.lora.lowrank import split_factors
from xlbake.lora.moments import compress
from xlbake.lora.names import LoraTarget
from xlbake.lora.whiten import unwhiten, whiten_scaled, whitened_error, whitening_factor

SHAPES = ((1280, 1280), (1280, 2048), (10240, 1280), (1280, 5120), (640, 640))
QUICK = ((1280, 1280), (640, 2048), (5120, 640))


def moment(n: int, gen: torch.Generator) -> torch.Tensor:
    """C (n, n): eigenvalues ~ 1/i and 3 outlier directions, in a random basis (from n x 2n samples)."""
    scales = torch.arange(1, 2 * n + 1, dtype=torch.float64) ** -0.5
    scales[:3] *= 10
    x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64) * scales
    return x @ x.mT / n


def seconds(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def dense_reference(diff: torch.Tensor, c: torch.Tensor, settings: FactorSettings) -> tuple[torch.Tensor, ...]:
    """The earlier calibrated path: dense Cholesky S, ΔW S by GEMM, fast SVD, down S⁻¹ by a triangular solve."""
    whitened, factor = whiten_scaled(diff, whitening_factor(c))
    up, down = split_factors(truncated_svd(whitened, settings.rank, settings), settings.rank)
    return up, unwhiten(down, factor)


def measure(out: int, inp: int, gen: torch.Generator, plain: FactorSettings) -> tuple[dict[str, float], list[float]]:
    """CPU seconds of each path and the relative output errors (plain, compressed, dense) of one layer."""
    name = f"{out}x{inp}"
    target = LoraTarget(name, "unet", name, None, "linear", (out, inp))
    c = moment(inp, gen)
    calibrated = replace(plain, calibration=Calibration({name: compress(c)}, {name: name}, {}))
    diff = torch.randn(out, inp, generator=gen) * torch.arange(1, inp + 1) ** -0.3
    energy = float(diff.square().sum())
    runs = {
        "plain": lambda: factor_layer(target, diff, energy, plain),
        "calibrated": lambda: factor_layer(target, diff, energy, calibrated),
        "dense": lambda: dense_reference(diff, c, plain),
    }
    times = {key: seconds(fn) for key, fn in runs.items()}
    reference = whitened_error(diff, torch.zeros(out, 0), torch.zeros(0, inp), c)
    errors = []
    for key, fn in runs.items():
        found = fn()
        up, down = (found.up, found.down) if key != "dense" else found
        errors.append(whitened_error(diff, up, down, c) / reference)
    return times, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three smaller layers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    plain = FactorSettings.from_config(ExtractConfig(dim=(128,)))
    totals = {"plain": 0.0, "calibrated": 0.0, "dense": 0.0}
    print(f"{'layer':>11} {'plain s':>8} {'calib. s':>8} {'dense s':>8} {'ratio':>6}   output error: "
          f"{'plain':>6} {'compr.':>6} {'dense':>6}")  # fmt: skip
    for out, inp in QUICK if args.quick else SHAPES:
        times, errors = measure(out, inp, gen, plain)
        for key, value in times.items():
            totals[key] += value
        row = " ".join(f"{times[key]:8.3f}" for key in ("plain", "calibrated", "dense"))
        ratio = times["calibrated"] / times["plain"]
        print(f"{out:>5}x{inp:<5} {row} {ratio:6.2f}   {'':>14}" + " ".join(f"{e:6.3f}" for e in errors))
    ratio, before = totals["calibrated"] / totals["plain"], totals["dense"] / totals["plain"]
    print(f"calibrated / plain extraction time: {ratio:.2f}x (dense whitening: {before:.2f}x); goal <= 1.5x")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
