import math

import pytest

from sdmoe.experiments import stats
from sdmoe.experiments.runs import _tails_overlap, steps_ratio


def test_t_quantiles():
    assert stats.t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert stats.t975(30) == pytest.approx(2.0423, abs=1e-4)
    # beyond the table: Cornish-Fisher, against published values
    assert stats.t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert stats.t975(120) == pytest.approx(1.9799, abs=2e-4)
    assert math.isnan(stats.t975(0))


def test_t_interval_matches_the_spec_example():
    # sd-moe-spec.md: gains 0.049, 0.068, 0.091 -> mean 0.069, 95% interval 0.017 to 0.122
    iv = stats.t_interval([0.049, 0.068, 0.091])
    assert iv.mean == pytest.approx(0.0693, abs=1e-4)
    assert iv.lo == pytest.approx(0.017, abs=1e-3) and iv.hi == pytest.approx(0.122, abs=1e-3)
    one = stats.t_interval([0.05, float("nan"), None])
    assert one.n == 1 and math.isnan(one.lo)


def test_crossing_step_interpolates():
    steps, loss = [0, 100, 200, 300], [6.0, 5.0, 4.0, 3.5]
    assert stats.crossing_step(steps, loss, 4.5) == pytest.approx(150.0)
    assert stats.crossing_step(steps, loss, 4.0) == pytest.approx(200.0)
    assert stats.crossing_step(steps, loss, 3.0) is None
    assert stats.crossing_step(steps, loss, 7.0) == 0.0
    assert stats.crossing_step(steps, loss, 3.75, max_step=240) is None  # would cross at 250
    assert stats.crossing_step(steps, loss, 3.75, max_step=300) == pytest.approx(250.0)


def test_verdict_boundaries():
    v = stats.verdict
    assert v(0.01, 0.2) == stats.REPRODUCED
    assert v(-0.2, -0.01) == stats.NOT_REPRODUCED
    assert v(-0.1, 0.1) == stats.INCONCLUSIVE
    assert v(0.0, 0.1) == stats.INCONCLUSIVE  # touching the threshold is not excluding it
    assert v(float("nan"), float("nan")) == stats.INCONCLUSIVE
    # claimed below a threshold: step time <= 1.05
    assert v(0.98, 1.04, 1.05, -1) == stats.REPRODUCED
    assert v(1.10, 1.20, 1.05, -1) == stats.NOT_REPRODUCED
    assert v(1.00, 1.10, 1.05, -1) == stats.INCONCLUSIVE
    assert stats.combine([stats.REPRODUCED, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.combine([stats.REPRODUCED, stats.NOT_REPRODUCED]) == stats.NOT_REPRODUCED
    assert stats.combine([stats.REPRODUCED] * 2) == stats.REPRODUCED
    # a part the compare cannot test leaves the claim not measurable, unless another part already failed
    assert stats.combine([stats.REPRODUCED, stats.NOT_MEASURABLE]) == stats.NOT_MEASURABLE
    assert stats.combine([stats.INCONCLUSIVE, stats.NOT_MEASURABLE]) == stats.NOT_MEASURABLE
    assert stats.combine([stats.NOT_REPRODUCED, stats.NOT_MEASURABLE]) == stats.NOT_REPRODUCED


def test_a_verdict_stands_only_beyond_the_noise():
    assert stats.beyond_noise(stats.REPRODUCED, 1.01, 1.05, 0.02)
    assert not stats.beyond_noise(stats.REPRODUCED, 1.01, 1.05, 0.05)
    assert not stats.beyond_noise(stats.NOT_REPRODUCED, 1.08, 1.05, float("nan"))  # unknown noise: no verdict
    assert stats.beyond_noise(stats.INCONCLUSIVE, 1.05, 1.05, 1.0)  # nothing to overrule


def test_no_interval_of_zero_width():
    iv = stats.t_interval([0.0, 0.0, 0.0])
    assert iv.n == 3 and iv.std == 0.0 and math.isnan(iv.lo) and math.isnan(iv.hi)
    assert "no interval" in iv.text()
    assert stats.verdict(iv.lo, iv.hi) == stats.INCONCLUSIVE


def _run(steps, curve, step_time, total):
    return {"status": "done", "steps": total, "final_mean": curve[-1], "log_every": 10,
            "curve": {"step": steps, "mean": curve},
            "log": {"step": list(range(10, total + 1, 10)), "step_time": [step_time] * (total // 10)}}


def test_steps_and_wall_clock_to_target():
    base = _run([50, 100, 150, 200], [5.0, 4.6, 4.4, 4.2], 0.1, 200)
    sd = _run([50, 100, 150, 200], [4.8, 4.4, 4.1, 4.0], 0.12, 200)
    ratio, wall = steps_ratio(sd, base)
    # sd reaches 4.2 between 100 (4.4) and 150 (4.1): 100 + 50 * 0.2/0.3
    assert ratio == pytest.approx((100 + 50 * 2 / 3) / 200)
    assert wall == pytest.approx(ratio * 0.12 / 0.1)
    never = _run([50, 100], [5.0, 4.9], 0.1, 200)
    assert steps_ratio(never, base) == (None, None)


def test_tails_overlap_read_from_the_monitor_record():
    rec = {"param_overlap/mean": 0.4, "sdmoe": {"k": 8, "random_baseline": 0.125, "layers": [
        {"layer": 0, "tails_overlap": {"gate": 0.1, "up": 0.2, "down": 0.3}},
        {"layer": 1, "tails_overlap": {"gate": 0.1, "up": 0.1, "down": 0.1}}]}}
    assert _tails_overlap(rec) == pytest.approx(0.15)
    assert _tails_overlap({"param_overlap/mean": 0.4}) is None
