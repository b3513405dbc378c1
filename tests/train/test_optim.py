import pytest

from sdmoe.train.config import OptimConfig
from sdmoe.train.optim import lr_scale


def test_schedule_warms_up_then_decays_to_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    scales = [lr_scale(s, 100, cfg) for s in range(100)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(scales[10:], scales[11:]))  # monotone decay
    assert lr_scale(100, 100, cfg) == pytest.approx(0.1)
