"""Step overhead of the finetune trainer against a bare training loop, on the tiny model (CPU).

    python -m benchmarks.bench_step --quick     # 8 timed steps per run, 2 rounds (make bench)
    python -m benchmarks.bench_step             # 40 timed steps per run, 3 rounds

Both loops train the builtin tiny model on the builtin demo dataset with the same data (the trainer's dataset,
bucket sampler and collate, no workers), batch, AdamW, gradient clipping and fp32 math: VAE encode, noise,
timesteps, both text encoders, UNet, MSE, backward, step. The bare loop is written below in plain torch; the
trainer (finetune.trainer.Trainer, EMA/sampling/tracking/progress bar off, one final save after the timed
steps) adds accelerate, the LR schedule, finiteness checks, loss bookkeeping and logging. The per-step time is
the median interval between optimizer steps after a warm-up, in wall time and in this process's CPU time (one
torch thread, no workers: the CPU time is the work done, unaffected by other processes on a shared machine, and
equals the wall time on an idle one); runs alternate (trainer, bare, trainer, ...) and the medians of the rounds
are compared. Target: trainer <= 1.1 x bare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from finetune.config import FinetuneConfig
from xlbake.config import load_config

TARGET_RATIO = 1.1
WARMUP_STEPS = 3
BATCH = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 timed steps per run, 2 rounds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 40, quick 8)")
    parser.add_argument("--rounds", type=int, default=None, help="trainer/bare pairs (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared 2-core box: 1)")
    return parser.parse_args(argv)


def make_config(run_dir: Path, steps: int) -> FinetuneConfig:
    """The demo run (tiny model, 64 px buckets, batch 4) reduced to the training math the bare loop also does."""
    data = {
        "run_dir": str(run_dir),
        "model": {"base": "builtin:tiny"},
        "data": {
            "roots": ["builtin:demo"],
            "resolution": 64,
            "min_bucket_reso": 32,
            "max_bucket_reso": 128,
            "bucket_step": 8,
            "random_crop": True,
        },
        "train": {"epochs": 1000, "max_steps": WARMUP_STEPS + steps, "batch_size": BATCH, "grad_accum": 1},
        "optim": {"name": "adamw", "unet_lr": 1e-4, "te1_lr": 5e-5, "te2_lr": 5e-5, "max_grad_norm": 1.0},
        "precision": {"mixed": "no"},
        "checkpoint": {"fp32_copy": False, "save_state": False},
        "log": {"tensorboard": False, "loss_plot": False, "progress": False},
    }
    return load_config(FinetuneConfig, data=data)


Stamp = tuple[float, float]
"""(wall clock, process CPU time) in seconds."""


def _stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


def trainer_step_times(cfg: FinetuneConfig) -> list[Stamp]:
    """(wall, CPU) seconds between consecutive optimizer steps of ``Trainer.train`` (after the warm-up)."""
    from finetune.trainer import Trainer

    trainer = Trainer(cfg)
    stamps: list[Stamp] = []
    try:
        trainer.setup()
        after_step = trainer._after_step

        def stamped(*args, **kwargs) -> None:
            after_step(*args, **kwargs)
            stamps.append(_stamp())

        trainer._after_step = stamped
        trainer.train()
    finally:
        trainer.cleanup()
    return _intervals(stamps)


def bare_step_times(cfg: FinetuneConfig, builtin_dir: Path) -> list[Stamp]:
    """The same training in a plain loop: no accelerate, schedule, checks, bookkeeping or logging."""
    from torch.utils.data import DataLoader

    from finetune.data import build_dataset, collate
    from finetune.model import load_model, resolve_inputs, setup_trainable
    from finetune.optim import build_optimizer
    from finetune.sampler import BucketBatchSampler
    from finetune.text import encode_prompt

    torch.manual_seed(cfg.train.seed)
    inputs = resolve_inputs(cfg.model.base, cfg.model.components, cfg.data.roots, builtin_dir)
    model = load_model(inputs.base, inputs.components)
    groups = setup_trainable(model, cfg.model, cfg.optim, cfg.precision)
    params = [p for g in groups for p in g.params]
    optimizer = build_optimizer(groups, cfg.optim)
    dataset = build_dataset(
        replace(cfg.data, roots=inputs.roots), cfg.caption, (model.tokenizer, model.tokenizer_2), seed=cfg.train.seed
    )
    loader = DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, BATCH, 0), collate_fn=collate)
    alphas = model.noise_scheduler.alphas_cumprod
    scale = model.vae.config.scaling_factor
    stamps: list[Stamp] = []
    while len(stamps) < cfg.train.max_steps:
        for batch in loader:
            with torch.no_grad():
                latents = model.vae.encode(batch["pixel_values"]).latent_dist.sample() * scale
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, len(alphas), (len(latents),))
            a = alphas[timesteps].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            embeds, pooled = encode_prompt(
                model.text_encoder, model.text_encoder_2, batch["input_ids_1"], batch["input_ids_2"]
            )
            time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1).float()
            added = {"text_embeds": pooled, "time_ids": time_ids}
            pred = model.unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample
            torch.nn.functional.mse_loss(pred, noise).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(_stamp())
            if len(stamps) == cfg.train.max_steps:
                break
    return _intervals(stamps)


def _intervals(stamps: list[Stamp]) -> list[Stamp]:
    pairs = zip(stamps[WARMUP_STEPS - 1 :], stamps[WARMUP_STEPS:], strict=False)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in pairs]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    steps = args.steps or (8 if args.quick else 40)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    medians: dict[tuple[str, int], list[float]] = {(n, k): [] for n in ("trainer", "bare") for k in (0, 1)}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        builtin = Path(tmp) / "run-0" / "builtin"  # the tiny model and demo data the first trainer run builds
        for round_index in range(rounds):
            cfg = make_config(Path(tmp) / f"run-{round_index}", steps)
            for name in ("trainer", "bare"):
                times = trainer_step_times(cfg) if name == "trainer" else bare_step_times(cfg, builtin)
                for kind in (0, 1):
                    medians[name, kind].append(statistics.median(t[kind] for t in times))
                wall, cpu = (1000 * medians[name, k][-1] for k in (0, 1))
                print(f"round {round_index + 1} {name:7s}: {wall:7.1f} ms/step wall, {cpu:7.1f} ms CPU", flush=True)
    print(
        f"\ntiny model, batch {BATCH}, 64 px buckets, {args.threads} torch thread(s), {steps} steps x {rounds} rounds:"
    )
    for kind, what in ((1, "CPU time"), (0, "wall time")):
        trainer, bare = (statistics.median(medians[n, kind]) for n in ("trainer", "bare"))
        ratio = trainer / bare
        verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
        print(
            f"  {what:9s}: trainer {1000 * trainer:7.1f} ms/step, bare loop {1000 * bare:7.1f} ms/step, ratio "
            f"{ratio:.3f} ({verdict} the {TARGET_RATIO}x target)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
