"""When SD-MoE does what: pure functions of the config and the step."""

from sdmoe.method import SDMoEConfig, schedule


def test_split_and_windows():
    cfg = SDMoEConfig(split_step=5, basis_batches=2, basis_source="gradients", reestimate_every=4)
    assert [s for s in range(8) if schedule.split_due(cfg, s)] == [5, 6, 7]
    assert [s for s in range(10) if schedule.in_window(cfg, s, False, True)] == [3, 4]
    # after the split: the basis_batches steps before each re-estimation (after steps 8, 12, ...)
    assert [s for s in range(5, 14) if schedule.in_window(cfg, s, True, True)] == [7, 8, 11, 12]
    assert not any(schedule.in_window(cfg, s, False, False) for s in range(10))  # nothing to collect


def test_refresh_reestimate_and_exact_steps():
    cfg = SDMoEConfig(split_step=2, refresh_every=3, reestimate_every=4, exact_every=5)
    assert [s for s in range(12) if schedule.refresh_due(cfg, s)] == [4, 7, 10]
    assert [s for s in range(12) if schedule.reestimate_due(cfg, s)] == [5, 9]
    assert [s for s in range(12) if schedule.exact_due(cfg, s)] == [0, 5, 10]
    assert not any(schedule.refresh_due(SDMoEConfig(), s) for s in range(300))
