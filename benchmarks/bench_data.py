"""Throughput of the finetune data pipeline at 1024^2 buckets against the rate a GPU consumes.

    python -m benchmarks.bench_data --quick                     # 12 images, the configured workers (make bench)
    python -m benchmarks.bench_data --workers 0,1,2 --images 48
    python -m benchmarks.bench_data --config configs/finetune/multi-gpu.yaml

Data: deterministic synthetic photos in kohya layout, larger than their buckets as camera/web images are
(1536x1024, 1024x1536, 2048x2048, 1920x1080, 1280x960, 3000x2000), three JPEG (quality 95) to one PNG, each with a
~40-word caption. They go through the trainer's own pipeline: finetune.data.build_dataset (the config's buckets,
crop and caption settings), BucketBatchSampler, collate and a DataLoader with the configured workers; per item that
is decode, EXIF transpose, resize (Lanczos), crop, normalize to fp32 and tokenization into 77-token windows for both
encoders. Tokenizers: SDXL's from the local hub cache if there, else the tiny model's BPE tokenizers (same code,
smaller vocabulary). An epoch is timed from the first batch requested (worker start-up included, as every epoch
restarts the workers) and reported in images/s, with a single-process breakdown per stage.

The rate to beat is an ASSUMPTION (finetune.planner.speed.A100_SDXL_IMAGES_PER_SECOND): an A100 trains SDXL at ~2 images
of 1024^2 per second; each GPU has its own data process and workers, so the need is per GPU. In a run, the progress
bar's `data` share (time waiting for the next batch) is the check.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.config import FinetuneConfig
from finetune.planner.speed import A100_SDXL_IMAGES_PER_SECOND
from xlbake.config import load_config

SIZES = ((1536, 1024), (1024, 1536), (2048, 2048), (1920, 1080), (1280, 960), (3000, 2000))
WORDS = (
    "a photo of woman man dog cat street city night light soft warm cold blue red green portrait close up wide shot "
    "cinematic detailed texture background bokeh film grain natural window sunset river forest"
)
"""Caption vocabulary (split into words when drawn)."""
CAPTION_WORDS = 40
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "a100-80gb.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 images")
    parser.add_argument("--images", type=int, default=None, help="images in the dataset (default 48, quick 12)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="finetune config (data, caption, train)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: the config's)")
    return parser.parse_args(argv)


def make_photos(folder: Path, n: int) -> Path:
    """``n`` synthetic photos with captions in ``folder/1_bench photo``: smooth colour fields with edges (drawn at
    1/8 size and upscaled) plus full-size grain, so that they compress and decode like photographs."""
    subset = folder / "1_bench photo"
    subset.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0 : height // 8, 0 : width // 8].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=(3, 3))
        field = np.stack(
            [
                127
                + 60 * np.sin(x / rng.uniform(10, 50) + p[0]) * np.cos(y / rng.uniform(10, 50) + p[1])
                + 40 * ((x + y * p[2]) % 40 < 20)
                for p in phase
            ],
            -1,
        )
        small = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        pixels = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-8, 9, size=(height, width, 1), dtype=np.int16)
        image = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
        name = subset / f"{i:04d}"
        image.save(name.with_suffix(".png" if i % 4 == 3 else ".jpg"), quality=95)
        name.with_suffix(".txt").write_text(" ".join(rng.choice(WORDS.split(), CAPTION_WORDS)))
    return folder


def tokenizers() -> tuple[tuple, str]:
    """SDXL's two CLIP tokenizers if cached locally, else the tiny model's (and which)."""
    from transformers import CLIPTokenizer

    from finetune.config import SDXL_HUB_ID

    try:
        pair = tuple(
            CLIPTokenizer.from_pretrained(SDXL_HUB_ID, subfolder=s, local_files_only=True)
            for s in ("tokenizer", "tokenizer_2")
        )
        return pair, "SDXL tokenizers (hub cache)"
    except OSError:
        from xlbake.sdxl.tiny import build_tokenizers

        return build_tokenizers(), "tiny-model BPE tokenizers (SDXL's are not cached here)"


def epoch_rate(dataset, cfg: FinetuneConfig, workers: int) -> float:
    """Images per second over one epoch of the trainer's DataLoader (worker start-up included)."""
    from torch.utils.data import DataLoader

    from finetune.data import collate
    from finetune.sampler import BucketBatchSampler

    sampler = BucketBatchSampler(dataset, cfg.train.batch_size, cfg.train.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    start = time.perf_counter()
    images = sum(len(batch["path"]) for batch in loader)
    return images / (time.perf_counter() - start)


def stage_times(dataset, count: int) -> dict[str, float]:
    """Median seconds per image of each stage, in this process (what one worker does per item)."""
    from finetune.data import load_pixels
    from finetune.text import tokenize_chunks
    from xlbake.data.kohya import open_image

    stages: dict[str, list[float]] = {"decode": [], "resize+crop+normalize": [], "tokenize (both)": []}
    for index in range(min(count, len(dataset))):
        sample = dataset.samples[dataset.sample_of[index]]
        geometry, _ = dataset.geometry(0, index)
        start = time.perf_counter()
        open_image(sample.image)
        decoded = time.perf_counter()
        load_pixels(sample.image, geometry, sample.size)  # decodes again, then the rest
        loaded = time.perf_counter()
        for tokenizer in dataset.tokenizers:
            tokenize_chunks(tokenizer, sample.caption, sample.caption_cfg.max_token_length)
        stages["decode"].append(decoded - start)
        stages["resize+crop+normalize"].append(max(0.0, (loaded - decoded) - (decoded - start)))
        stages["tokenize (both)"].append(time.perf_counter() - loaded)
    return {name: statistics.median(values) for name, values in stages.items()}


def main(argv: list[str]) -> int:
    from finetune.data import build_dataset

    args = parse_args(argv)
    cfg = load_config(FinetuneConfig, args.config)
    n_images = args.images or (12 if args.quick else 48)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [cfg.train.num_workers]
    pair, which = tokenizers()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        start = time.perf_counter()
        root = make_photos(Path(tmp), n_images)
        print(f"generated {n_images} photos in {time.perf_counter() - start:.1f} s; {which}", flush=True)
        data_cfg = replace(cfg.data, roots=(root,), cache_latents=False)
        dataset = build_dataset(data_cfg, cfg.caption, pair, seed=cfg.train.seed)
        buckets = sorted({s.bucket for s in dataset.samples})
        print(f"{args.config.name}: resolution {cfg.data.resolution}, batch {cfg.train.batch_size}, buckets {buckets}")
        for name, seconds in stage_times(dataset, n_images).items():
            print(f"  {name:24s} {1000 * seconds:7.1f} ms/image (one process)")
        need = A100_SDXL_IMAGES_PER_SECOND
        single = epoch_rate(dataset, cfg, 0)
        extra, step = 1 / single, 1 / need
        print(
            f"workers=0: {single:6.2f} images/s in the training process, between GPU steps: +{1000 * extra:.0f} ms "
            f"on every image's ~{1000 * step:.0f} ms A100 step (+{100 * extra / step:.0f} %)"
        )
        for count in (w for w in workers if w > 0):
            rate = epoch_rate(dataset, cfg, count)
            verdict = "keeps up with" if rate >= need else "is SLOWER than"
            print(f"workers={count}: {rate:6.2f} images/s beside training, {verdict} the {need:g} images/s needed")
    print(
        f"need: {need:g} images/s per GPU (ASSUMED A100 rate, see finetune/planner/speed.py); one process "
        f"loads {single:.2f} images/s here, so >= {math.ceil(need / single)} worker(s) per GPU keep up (more on a "
        f"slower CPU); configured: train.num_workers={cfg.train.num_workers}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
