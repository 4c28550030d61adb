"""The extract stage's options: one frozen dataclass, loaded from YAML, ``--set`` overrides and CLI flags."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xlbake.errors import ConfigError
from xlbake.lora.budget import parse_size

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``python -m extract`` needs; ``configs/extract.yaml`` lists the same keys with their defaults."""

    base: Path | None = None
    """Base model the finetune started from: single-file SDXL .safetensors (SGM keys) or a diffusers folder."""
    tuned: Path | None = None
    """Finetuned model, same architecture as ``base`` (any of fp32/fp16/bf16; fp32 keeps the most signal)."""
    out: Path | None = None
    """Output LoRA .safetensors. With several ranks, one file per rank: ``<stem>-dim16.safetensors`` (and its
    ``.report.json`` / ``.report.png`` beside it)."""
    dim: tuple[int, ...] = (32,)
    """Rank of Linear and 1x1 conv modules; a list (``16,32,64``) writes one file per rank from one factorization.
    With ``rank_method`` other than fixed or with ``size``, it is each layer's maximum rank."""
    conv_dim: tuple[int, ...] = (0,)
    """Rank of 3x3 conv modules (LoCon); 0 means no conv layers (kohya's 986-module set). One value for every
    file, or one per ``dim``."""
    rank_method: Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"] = "fixed"
    """fixed: ``dim`` everywhere. sv_ratio: keep singular values >= s[0] / rank_value. sv_fro: minimal rank keeping
    a rank_value fraction of the Frobenius norm. sv_cumulative: minimal rank whose singular values sum to a
    rank_value fraction of their total (needs the full spectrum: slower)."""
    rank_value: float | None = None
    """Parameter of ``rank_method`` (sv_ratio > 1; sv_fro and sv_cumulative in (0, 1])."""
    size: str | None = None
    """Global size budget: a file size (``100MB``, ``1.5GB``, ``64MiB``; MB = 10^6 bytes) or a parameter count
    (``50M``, ``12500000``). Each layer's rank (at most ``dim``) is chosen so that the file fits and keeps the most
    total energy (sum of kept sigma^2)."""
    svd: Literal["fast", "exact"] = "fast"
    """fast: randomized block Krylov SVD that stops on an error estimate; exact: LAPACK thin SVD.
    The default follows the benchmark (benchmarks/bench_extract.py, numbers in the README)."""
    precision: Literal["fp32", "fp64"] = "fp32"
    """Precision of the difference and its SVD."""
    power_iters: int = 3
    """Krylov blocks the fast SVD always builds, 3 at least (block Krylov, xlbake.lora.krylov.svd_adaptive); it
    adds more, up to 12, until the gains its a-posteriori error estimate extrapolates are below 0.5 % of the
    error, so flat spectra get more work than steep ones. Numbers in the README's benchmark section
    (benchmarks/bench_extract.py, benchmarks/bench_krylov.py)."""
    oversample: int = 0
    """Extra columns of the fast SVD's Krylov blocks, (dim + oversample) / 2 wide, at least min(24, (dim + 16) / 2).
    Its basis grows to 2.5x dim or more, so large ranks need none: at dim 128, 16 cost ~12 % more CPU for half the
    excess over the optimum (README's benchmark section)."""
    sketch_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of the fast SVD's products that only choose its Krylov subspace (the error estimate, the
    projection and the factors stay at ``precision``). Its rounding moves the error by < 1e-4 of the optimum when
    the rank-``dim`` error is above a tenth of the difference's norm (always so for fp16/bf16-stored models);
    below that the products turn exact (xlbake.lora.krylov). auto: bf16 where the hardware multiplies it natively
    (x86 CPUs with AVX512-BF16 or AMX, CUDA GPUs of compute capability >= 8.0 such as A100 and A6000), else fp32;
    precision fp64 stays fp64. fp32: never lower. bf16: always (slower than fp32 where it is emulated)."""
    seed: int = 0
    """Seed of the fast SVD's random sketch (the result is deterministic for a given seed)."""
    clamp_quantile: float = 1.0
    """Clamp factor entries to this quantile of their magnitudes, as kohya's extract_lora_from_models does with
    its default 0.99 (it clamps U*S and Vh to the 0.99 quantile of their values); 1.0 (our default) means no
    clamping, which keeps the optimal low-rank approximation."""
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Precision of the LoRA file's tensors."""
    extra_layers: bool = False
    """Also extract the layers kohya leaves out (time/label embeddings, and with a conv dim conv_in/conv_out).
    They load in ComfyUI, A1111 and diffusers >= 0.39; older diffusers crash and Forge may skip the LoRA."""
    min_diff: float = 1e-6
    """A component (unet, te1, te2) is extracted when its difference is at least this fraction of its weights
    (||tuned - base|| / ||base|| over its LoRA layers). Not kohya's absolute 0.01, which drops the text encoders
    of any low-learning-rate finetune."""
    allow_swapped: bool = False
    """Extract even when ``base``'s metadata says it is a finetune of ``tuned`` (the files look swapped: the LoRA
    would undo the finetune)."""
    calibration: Path | None = None
    """Activation statistics (a ``calibration.safetensors``) for calibrated extraction: each Linear / 1x1 conv
    difference is factored to keep the most of its effect on the layer's real inputs, ``||(dW - BA) C^1/2||`` with
    ``C = E[x x^T]``, instead of the most weight energy. Off by default (see benchmarks/bench_calibrate.py)."""
    calibrate_convs: bool = False
    """With calibration, also whiten the 3x3 convs (Kronecker channel x kernel-tap statistics). Off: on the tiny
    finetunes it kept less of the effect than plain 3x3 convs (benchmarks/bench_calibrate.py, README)."""
    calibrate: Path | None = None
    """A finetune run folder: compute ``RUN/calibration.safetensors`` with one pass of ``base`` over a few of the
    run's images and captions, from the calibration half only (the other half is held out for ``xlbake fidelity
    --inputs dataset``; reused when present), and extract calibrated with it."""
    device: str = "auto"
    """Where the SVDs and the calibration pass run: auto (the GPU when torch sees one, else the CPU), cpu, cuda or
    cuda:N. Tensors are read one at a time either way."""
    config_version: int = 1
    """Version of this config's format."""

    def __post_init__(self) -> None:
        problems = []
        if not self.dim or min(self.dim) < 1:
            problems.append(f"dim: ranks must be >= 1, got {list(self.dim)}")
        if not self.conv_dim or min(self.conv_dim) < 0:
            problems.append(f"conv_dim: ranks must be >= 0 (0 = no conv layers), got {list(self.conv_dim)}")
        if len(self.conv_dim) not in (1, len(self.dim)):
            problems.append(f"conv_dim: give one value or one per dim ({len(self.dim)}), got {list(self.conv_dim)}")
        problems += self._rank_problems()
        if not 0.0 < self.clamp_quantile <= 1.0:
            problems.append(f"clamp_quantile: must be in (0, 1] (1 = no clamping), got {self.clamp_quantile}")
        if self.power_iters < 0 or self.oversample < 0:
            problems.append("power_iters and oversample must be >= 0")
        if self.min_diff < 0:
            problems.append(f"min_diff: must be >= 0, got {self.min_diff}")
        if not DEVICE_PATTERN.match(self.device):
            problems.append(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.calibration is not None and self.calibrate is not None:
            problems.append("calibration: give a calibration file or a run to calibrate on (calibrate), not both")
        if self.out is not None and self.out.suffix.lower() != ".safetensors":
            problems.append(f"out: {self.out} must end in .safetensors")
        if problems:
            raise ConfigError("; ".join(problems))

    def _rank_problems(self) -> list[str]:
        problems = []
        value = self.rank_value
        if self.rank_method == "fixed":
            if value is not None:
                problems.append("rank_value: only used with rank_method sv_ratio, sv_fro or sv_cumulative")
        elif value is None:
            problems.append(f"rank_value: rank_method {self.rank_method} needs a rank_value")
        elif self.rank_method == "sv_ratio" and value <= 1:
            problems.append(f"rank_value: sv_ratio must be > 1, got {value}")
        elif self.rank_method != "sv_ratio" and not 0 < value <= 1:
            problems.append(f"rank_value: {self.rank_method} must be in (0, 1], got {value}")
        if self.size is not None:
            try:
                parse_size(self.size)
            except ValueError as exc:
                problems.append(f"size: {exc}")
            if self.rank_method != "fixed":
                problems.append("size: a size budget chooses the ranks itself; use it with rank_method fixed")
            if len(self.dim) > 1:
                problems.append("size: give one dim (the largest rank a layer may get) with a size budget")
        return problems

    def check_paths(self) -> None:
        """ConfigError unless base, tuned and out are all given (they have no defaults)."""
        missing = [
            f"--{name} (or {name}: in the config)" for name in ("base", "tuned", "out") if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)}")

    def conv_dims(self) -> tuple[int, ...]:
        """The 3x3 conv rank of each file, one per ``dim``."""
        return self.conv_dim * len(self.dim) if len(self.conv_dim) == 1 else self.conv_dim
