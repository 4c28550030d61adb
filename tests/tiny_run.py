"""The part of a tiny finetune config every training test shares: the tiny model, the demo data, 32 px buckets."""

from pathlib import Path


def tiny_run_sections(tiny_paths, demo_dataset, run_dir: Path) -> dict:
    """``run_dir``, ``model`` and ``data`` sections of a fast tiny run; tests add train/optim/... themselves."""
    return {
        "run_dir": str(run_dir),
        "model": {"base": str(tiny_paths.single_file), "components": str(tiny_paths.diffusers_dir)},
        "data": {
            "roots": [str(demo_dataset)],
            "resolution": 32,
            "min_bucket_reso": 16,
            "max_bucket_reso": 64,
            "bucket_step": 8,
        },
    }
