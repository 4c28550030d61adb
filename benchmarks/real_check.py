"""The real-size check (``make test-real``): a random-weight SDXL base 1.0 single file -> one finetune step -> extract.

Not part of ``make test``: at real size it needs about 25 GB of RAM (the planner, `--plan`, on this run: 19.4 GiB while
loading, then 9.6 GiB of model plus 12.2 GiB of the frozen parts' fp32 base weights kept to save them) and some 10
minutes on 2 cores.

1. ``build``: a random-weight single-file SGM checkpoint in SDXL base 1.0's exact layout (2515 keys, fp16, about
   7 GB; normal weights of std 1/sqrt(fan in), norm scales 1, other vectors 0) from :mod:`xlbake.sdxl.configs`,
   written one tensor at a time (memory stays at the largest tensor) and kept in the cache folder for next time.
2. ``finetune``: one optimizer step of text encoder 1 only (UNet and text encoder 2 frozen), bf16 autocast,
   gradient checkpointing, through ``python -m finetune`` with the default ``model.components``, offline.
3. ``extract``: ``python -m extract`` on base and tuned, then the checks: UNet and text encoder 2 reported
   unchanged (bit-identical to the base), text encoder 1 extracted, and the LoRA's names and shapes those of kohya's
   SDXL text encoder 1 layers (``xlbake.sdxl.keys.kohya_targets`` of the meta-built real model).

Tokenizers: the run is offline, so SDXL's tokenizers cannot be fetched. The tiny model's tokenizers are laid out as
SDXL's hub repo in a private hub cache (HF_HUB_CACHE), so the finetune reads them through the same hub-cache lookup
a real box uses. Their token ids are below 49408 and they pad to 77 tokens, which is all the real text encoders
need; the vocabulary does not matter for random weights.

    python -m benchmarks.real_check                      # everything, real size
    python -m benchmarks.real_check --stage build        # only write (or reuse) the 7 GB base
    python -m benchmarks.real_check --size tiny          # the same chain on the tiny architecture, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from xlbake.cli import setup_logging

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "real-check"
TE1_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
TE2_LOGIT_SCALE = "conditioner.embedders.1.model.logit_scale"
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
MIN_DIFF = 1e-9
"""extract's --min-diff: one step at a small LR moves TE1 little; anything exactly zero is still "unchanged"."""
CLIP_LOGIT_SCALE = 4.6052
"""log(1 / 0.07), CLIP's initial logit scale (unused by SDXL; present in the real file)."""
LORA_DIM = 8
FROZEN = ("unet", "te2")


def checkpoint_layout(configs: Mapping[str, Mapping] | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """SGM key -> (shape, dtype) of a single file of ``configs`` (default: SDXL base 1.0, 2515 keys) as fp16."""
    from xlbake.sdxl.configs import build_components
    from xlbake.sdxl.keys import plan_from_diffusers, sgm_shape

    models = build_components(configs, meta=True)
    shapes = {c: {k: tuple(t.shape) for k, t in m.state_dict().items()} for c, m in models.items()}
    plan = plan_from_diffusers({c: list(s) for c, s in shapes.items()})
    layout = {k: (sgm_shape(e, [shapes[e.component][d] for d in e.diffusers]), torch.float16) for k, e in plan.items()}
    positions = models["text_encoder"].config.max_position_embeddings
    layout[TE1_POSITION_IDS] = ((1, positions), torch.int64)
    layout[TE2_LOGIT_SCALE] = ((), torch.float16)
    return layout


def write_random_checkpoint(
    path: Path, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], *, seed: int = 0, fill: bool = True
) -> Path:
    """Write a safetensors file of ``layout`` with random weights, one tensor at a time, atomically.

    ``fill=False`` writes only the header and leaves the data a hole (a sparse file of the full size): enough for
    anything that reads shapes only.
    """
    keys = sorted(layout)
    header: dict[str, object] = {"__metadata__": {"modelspec.title": "random SDXL (xlbake real check)"}}
    offset = 0
    for key in keys:
        shape, dtype = layout[key]
        size = torch.Size(shape).numel() * dtype.itemsize
        entry = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        header[key] = entry
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    generator = torch.Generator().manual_seed(seed)
    temp = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(temp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if fill:
            for key in keys:
                f.write(_random_tensor(key, *layout[key], generator).numpy().tobytes())
        else:
            f.truncate(8 + len(raw) + offset)
    os.replace(temp, path)
    return path


def _random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if key == TE1_POSITION_IDS:
        return torch.arange(shape[-1], dtype=dtype).reshape(shape)
    if key == TE2_LOGIT_SCALE:
        return torch.tensor(CLIP_LOGIT_SCALE, dtype=dtype)
    if len(shape) >= 2:  # std 1/sqrt(fan in) keeps activations and gradients alive through the random layers
        return torch.randn(shape, generator=generator).div_(math.sqrt(math.prod(shape[1:]))).to(dtype)
    # the only 1-D weights are norm scales (SGM names many GroupNorms by position, e.g. "in_layers.0.weight")
    return (torch.ones if key.endswith("weight") else torch.zeros)(shape, dtype=dtype)


def build_base(cache: Path, size: str) -> Path:
    """The random base of ``size`` ("real" or "tiny") in ``cache``, written on first use and reused afterwards."""
    path = cache / f"sdxl-{size}-random-fp16.safetensors"
    if path.exists():
        print(f"base: reusing {path}", flush=True)
        return path
    configs = None
    if size == "tiny":
        from xlbake.sdxl.tiny import build_tokenizers, tiny_configs

        configs = tiny_configs(*build_tokenizers())
    start = time.perf_counter()
    layout = checkpoint_layout(configs)
    write_random_checkpoint(path, layout)
    print(f"base: wrote {path} ({len(layout)} keys, {path.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return path


def offline_env(cache: Path) -> dict[str, str]:
    """The environment of the stage commands: offline, SDXL's tokenizers (the tiny ones) in a private hub cache."""
    from xlbake.sdxl.models import SDXL_HUB_ID
    from xlbake.sdxl.tiny import save_tokenizers_as_hub_cache

    hub = cache / "hub"
    if not (hub / f"models--{SDXL_HUB_ID.replace('/', '--')}").exists():
        save_tokenizers_as_hub_cache(hub, SDXL_HUB_ID)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "PYTHONPATH": str(REPO)}


def finetune(base: Path, run: Path, env: Mapping[str, str]) -> Path:
    """One optimizer step of TE1 only, bf16 autocast, gradient checkpointing; returns the fp32 tuned file."""
    sets = {
        "run_dir": run,
        "model.base": base,
        "model.gradient_checkpointing": "true",
        "optim.unet_lr": 0,
        "optim.te1_lr": "1e-5",
        "optim.te2_lr": 0,
        "precision.mixed": "bf16",
        "ema.enabled": "false",
        "train.max_steps": 1,
        "train.batch_size": 1,
        "checkpoint.weights": "raw",
        "data.resolution": 64,  # 64 px buckets in steps of 32: latents divisible by 4, as SDXL's UNet needs
        "data.min_bucket_reso": 32,
        "data.max_bucket_reso": 128,
        "data.bucket_step": 32,
        "sample.prompts": "[]",
        "log.tensorboard": "false",
    }
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    _run([sys.executable, "-m", "finetune", "--config", str(REPO / "configs/finetune/tiny-cpu.yaml"), *args,
          "--force"], env)  # fmt: skip
    return run / "tuned.fp32.safetensors"


def extract_and_check(base: Path, tuned: Path, env: Mapping[str, str]) -> list[str]:
    """Extract a LoRA and return the failed checks (empty: all passed)."""
    from xlbake.lora.io import read_lora
    from xlbake.lora.names import kohya_targets
    from xlbake.sdxl.checkpoint import open_checkpoint

    lora_path = tuned.with_name(f"lora-dim{LORA_DIM}.safetensors")
    _run([sys.executable, "-m", "extract", "--base", str(base), "--tuned", str(tuned), "--dim", str(LORA_DIM),
          "--min-diff", str(MIN_DIFF), "--out", str(lora_path), "--force"], env)  # fmt: skip
    lora = read_lora(lora_path)
    decisions = json.loads(lora.metadata["xlbake_components"])
    failures = [f"{c} not reported unchanged: {decisions.get(c)}" for c in FROZEN
                if not str(decisions.get(c, "")).startswith("skipped: unchanged")]  # fmt: skip
    if not str(decisions.get("te1", "")).startswith("extracted"):
        failures.append(f"te1 not extracted: {decisions.get('te1')}")
    with open_checkpoint(base) as reader:
        targets = {t.name: t for t in kohya_targets(reader.shapes(), conv=False) if t.component == "te1"}
    last = f"_layers_{max(int(n.split('_layers_')[1].split('_')[0]) for n in targets)}_"
    reachable = {n for n in targets if last not in n}  # TE1's last layer gets no gradient in SDXL
    names = set(lora.modules)
    foreign, missing = sorted(names - set(targets)), sorted(reachable - names)
    if foreign:
        failures.append(f"{len(foreign)} LoRA modules are not TE1 targets, e.g. {foreign[0]}")
    if missing:
        failures.append(f"{len(missing)} trained TE1 layers missing from the LoRA, e.g. {missing[0]}")
    for name in sorted(names & set(targets)):
        module, shape = lora.modules[name], targets[name].shape
        if (module.up.shape[0], module.down.shape[1]) != (shape[0], shape[1]):
            failures.append(f"{name}: LoRA {tuple(module.up.shape)} x {tuple(module.down.shape)} does not fit {shape}")
    print(f"lora: {lora_path}: {len(names)} modules of {len(targets)} TE1 targets; components {decisions}", flush=True)
    return failures


def _run(command: list[str], env: Mapping[str, str]) -> None:
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=dict(env), cwd=REPO, check=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the base and runs are kept")
    parser.add_argument("--size", choices=("real", "tiny"), default="real", help="SDXL base 1.0, or the tiny model")
    parser.add_argument("--stage", choices=("build", "all"), default="all", help="stop after building the base")
    args = parser.parse_args(argv)
    setup_logging()
    base = build_base(args.cache, args.size)
    if args.stage == "build":
        return 0
    env = offline_env(args.cache)
    tuned = finetune(base, args.cache / f"run-{args.size}", env)
    failures = extract_and_check(base, tuned, env)
    for failure in failures:
        print(f"FAILED: {failure}", flush=True)
    print("real check: " + ("FAILED" if failures else "passed"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
