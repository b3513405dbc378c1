import pytest


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dataset):
    """A tiny run of 4 steps with checkpoints at steps 2 and 4."""
    from sdmoe.train.config import preset
    from sdmoe.train.loop import train

    cfg = preset("tiny")
    cfg.loop.steps, cfg.loop.checkpoint_every, cfg.loop.monitor_every, cfg.loop.threads = 4, 2, 0, 1
    run = tmp_path_factory.mktemp("finished") / "run"
    train(cfg, run, progress=False, dataset=tiny_dataset)
    return run
