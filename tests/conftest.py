"""Shared fixtures: a hermetic token cache and one tiny prepared dataset per session."""

import os

import pytest


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
