"""Shared fixtures: the tiny SDXL model and the demo dataset, built once per test session (offline, seconds)."""

import os

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
