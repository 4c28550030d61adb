"""The data a run trains on, as the trainer takes it: the dataset (each image's VAE latents cached on disk with
data.cache_latents), the sampler that deals its batches to the processes, the optimizer steps they make, and the
dataset's kohya keys that every output carries."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from finetune.config import FinetuneConfig
from finetune.data import CheckedData, TrainDataset, build_dataset
from finetune.latent_cache import CACHE_DIR, build_latent_cache
from finetune.model import SdxlModel
from finetune.sampler import BucketBatchSampler
from xlbake.data.meta import dataset_metadata
from xlbake.data.steps import steps_per_epoch

logger = get_logger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """A run's data and the optimizer steps it makes."""

    dataset: TrainDataset
    sampler: BucketBatchSampler  # this process's batches of every epoch, resumable mid-epoch
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # optimizer steps of the run: train.epochs of them, at most train.max_steps
    metadata: dict[str, str]  # kohya's dataset keys (ss_tag_frequency, ...), copied into every output and LoRA


def load_training_data(
    cfg: FinetuneConfig,
    roots: tuple[Path, ...],
    model: SdxlModel,
    accelerator: Any,
    run_dir: Path,
    checked: CheckedData | None = None,
) -> TrainingData:
    """The data of ``cfg`` in the dataset folders ``roots`` (the builtin demo resolved), tokenized for ``model``
    (and encoded by its VAE into RUN/cache/latents with data.cache_latents); ``checked``: the dataset as
    ``check_dataset`` found it before the run started (else checked here)."""
    tokenizers = (model.tokenizer, model.tokenizer_2)
    data_cfg = replace(cfg.data, roots=roots)
    dataset = build_dataset(data_cfg, cfg.caption, tokenizers, seed=cfg.train.seed, logger=logger, checked=checked)
    folders = ((s.image.parent.name, s.repeats, s.caption) for s in dataset.samples)
    metadata = dataset_metadata(folders, cfg.data.triggers)
    if cfg.data.cache_latents:
        progress = cfg.log.progress and accelerator.is_local_main_process
        cache = build_latent_cache(dataset, model.vae, run_dir / CACHE_DIR, accelerator, progress=progress)
        dataset.latent_source = cache
    sampler = BucketBatchSampler(
        dataset, cfg.train.batch_size, cfg.train.seed, accelerator.num_processes, accelerator.process_index
    )
    per_epoch = steps_per_epoch(sampler.total_batches, cfg.train.grad_accum, accelerator.num_processes)
    total = cfg.train.epochs * per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    return TrainingData(dataset, sampler, per_epoch, total, metadata)
