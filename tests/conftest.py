"""Shared fixtures: the tiny SDXL model and the demo dataset, built once per test session (offline, seconds)."""

import os
from pathlib import Path

# Scripts the tests start from tests/ (the reliability and distributed helpers) have tests/ first on sys.path, where
# tests/finetune/ (no __init__.py) would be taken for the finetune package unless the repository is on the path too.
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# pytest-xdist runs one worker per core: one intra-op thread each avoids oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch intra-op thread in every test, even when OMP_NUM_THREADS is set otherwise: the tiny models and small
    QR/SVDs gain nothing from more, and extra threads spin and oversubscribe a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """The tiny SDXL model as a diffusers folder and a single-file SGM checkpoint."""
    from xlbake.sdxl.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """The built-in procedurally drawn dataset in kohya layout."""
    from xlbake.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_images=8)


@pytest.fixture(scope="session")
def sdxl_header_only(tmp_path_factory):
    """SDXL base 1.0's exact single-file layout (2515 keys) with no data: a sparse file, for code reading shapes."""
    from benchmarks.real_check import checkpoint_layout, write_random_checkpoint

    path = tmp_path_factory.mktemp("sdxl") / "sdxl-header-only.safetensors"
    return write_random_checkpoint(path, checkpoint_layout(), fill=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty private Hugging Face hub cache (HF_HUB_CACHE), offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"
