"""Shared fixtures: a hermetic token cache and one tiny prepared dataset per session; `gpu` tests
skipped, with the reason, where torch sees no CUDA GPU."""

import os

import pytest

# The `gpu` tests compare a CUDA device against the CPU. Without a GPU they are skipped; with this
# variable set they run with the CPU standing in for the GPU (a dry run of the test code itself,
# which is how `benchmarks/gpu_check.py --tiny` keeps them working on CPU-only CI).
GPU_DRY_RUN = "SDMOE_GPU_TESTS_ON_CPU"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or os.environ.get(GPU_DRY_RUN):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU, and torch {torch.__version__} sees none "
                                   f"({GPU_DRY_RUN}=1 runs them on the CPU as a dry run)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    # Tests never read or write the user's ~/.cache/sdmoe.
    os.environ["SDMOE_CACHE"] = str(tmp_path_factory.mktemp("sdmoe-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def tiny_dataset(_hermetic_cache):
    from sdmoe.data import prepare_dataset
    from sdmoe.train.config import preset

    cfg = preset("tiny")
    return prepare_dataset(cfg.data, seed=cfg.loop.seed)


@pytest.fixture()
def tiny_config():
    from sdmoe.train.config import preset

    cfg = preset("tiny")
    cfg.loop.monitor_every = 0
    return cfg


@pytest.fixture()
def one_thread():
    """Tiny shapes: one thread is faster and immune to oversubscribed cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
