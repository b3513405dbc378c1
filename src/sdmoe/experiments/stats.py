"""Paired statistics for the compare: differences per seed, t-intervals, steps-to-target, verdicts.

No scipy: the two-sided 95% Student-t quantiles for df 1..30 are tabulated,
beyond that a Cornish-Fisher expansion (error < 1e-4 at df > 30).

Five verdicts: reproduced, not reproduced, inconclusive (measured, but the
interval or the machine's noise reaches the threshold), not as stated (a claim that
states a number: the interval lies on the claimed side but away from that number,
e.g. "fewer steps, not ~0.7x"), and not measurable (this compare cannot test the
claim; the claim's row says why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30.
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
Z975 = 1.959964

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
NOT_AS_STATED, NOT_MEASURABLE = "not as stated", "not measurable"
VERDICTS = (REPRODUCED, NOT_AS_STATED, NOT_REPRODUCED, INCONCLUSIVE, NOT_MEASURABLE)
BADGE = {REPRODUCED: "pass", NOT_AS_STATED: "warn", NOT_REPRODUCED: "fail", INCONCLUSIVE: "warn",
         NOT_MEASURABLE: "info"}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (95% two-sided)."""
    if df < 1:
        return math.nan
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def std(values: Sequence[float | None]) -> float:
    """Sample standard deviation (n - 1); nan below two values."""
    v = _finite(values)
    if len(v) < 2:
        return math.nan
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


@dataclass
class Interval:
    mean: float
    lo: float
    hi: float
    n: int
    std: float
    values: list[float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "std": self.std, "values": self.values}

    def text(self, fmt: str = "{:.3f}") -> str:
        if not math.isfinite(self.mean):
            return "-"
        if self.n < 2:
            return f"{fmt.format(self.mean)} (1 value, no interval)"
        if not math.isfinite(self.lo):
            return f"{fmt.format(self.mean)} (every value the same, no interval)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


def t_interval(values: Sequence[float | None]) -> Interval:
    """Mean and 95% t-interval of the finite values.

    lo = hi = nan below two values, and when every value is the same: an interval of
    zero width would read as certainty where there is only no spread to estimate it from.
    """
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan, [])
    mean = sum(v) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan, v)
    s = std(v)
    if s == 0.0:
        return Interval(mean, math.nan, math.nan, n, 0.0, v)
    half = t975(n - 1) * s / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, s, v)


def paired_differences(a: dict, b: dict) -> dict:
    """a[key] - b[key] for every key both hold with finite values (e.g. seed -> final loss)."""
    out = {}
    for k in sorted(set(a) & set(b), key=str):
        if a[k] is not None and b[k] is not None and math.isfinite(a[k]) and math.isfinite(b[k]):
            out[k] = float(a[k]) - float(b[k])
    return out


def crossing_step(steps: Sequence[float], values: Sequence[float], target: float,
                  max_step: float | None = None) -> float | None:
    """First step where the curve (linear between points) reaches `target` or below; None if never.

    Steps are absolute training steps (warm-up included). A curve already at or
    below the target at its first point returns that point's step.
    """
    pts = [(float(s), float(v)) for s, v in zip(steps, values) if v is not None and math.isfinite(float(v))]
    pts.sort()
    prev = None
    for s, v in pts:
        if max_step is not None and s > max_step:
            if prev is not None and prev[1] > target >= v:
                cross = prev[0] + (prev[1] - target) / (prev[1] - v) * (s - prev[0])
                return cross if cross <= max_step else None
            return None
        if v <= target:
            if prev is None:
                return s
            s0, v0 = prev
            return s0 + (v0 - target) / (v0 - v) * (s - s0)
        prev = (s, v)
    return None


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) (clamped at the ends); nan on an empty curve."""
    pts = sorted(zip(map(float, xs), map(float, ys)))
    if not pts:
        return math.nan
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def cumulative_time(log_steps: Sequence[int], step_times: Sequence[float]) -> tuple[list[float], list[float]]:
    """Wall-clock seconds elapsed at each logged step, from the per-window mean step times."""
    xs, ys, t, last = [0.0], [0.0], 0.0, 0
    for s, st in sorted(zip(log_steps, step_times)):
        t += float(st) * (int(s) - last)
        last = int(s)
        xs.append(float(s))
        ys.append(t)
    return xs, ys


def verdict(lo: float, hi: float, threshold: float = 0.0, direction: int = +1) -> str:
    """Claimed: the value lies above `threshold` (direction +1) or below it (-1).

    reproduced: the whole interval on the claimed side; not reproduced: the
    whole interval on the other side (the estimate misses the threshold and the
    interval excludes it); inconclusive otherwise (or no interval).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    lo_, hi_ = (lo - threshold, hi - threshold) if direction > 0 else (threshold - hi, threshold - lo)
    if lo_ > 0:
        return REPRODUCED
    if hi_ < 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def sized_verdict(lo: float, hi: float, threshold: float, direction: int, stated: float, tolerance: float) -> str:
    """A claim that states a number (`stated`, e.g. ~0.7x the steps) beyond a direction (below `threshold`,
    1x): reproduced only when the whole interval lies within `stated` +- `tolerance`; not as stated when it
    lies on the claimed side but wholly outside that band; inconclusive when it reaches into the band and out
    of it; `verdict`'s answer when the direction itself is not established."""
    direction_verdict = verdict(lo, hi, threshold, direction)
    if direction_verdict != REPRODUCED:
        return direction_verdict
    if stated - tolerance <= lo and hi <= stated + tolerance:
        return REPRODUCED
    if lo > stated + tolerance or hi < stated - tolerance:
        return NOT_AS_STATED
    return INCONCLUSIVE


def beyond_noise(verdict_: str, mean: float, threshold: float, noise: float) -> bool:
    """Whether a verdict from an interval stands against the machine's noise (same units as `mean`).

    A paired interval can be narrow while each side's own time moves more than the
    ratio's distance to the threshold; then the next run on the same machine may land
    on the other side, and the verdict is the noise's, not the method's.
    """
    if verdict_ not in (REPRODUCED, NOT_REPRODUCED):
        return True
    return math.isfinite(noise) and noise < abs(mean - threshold)


def combine(verdicts: Sequence[str]) -> str:
    """A claim of several parts: any part not reproduced -> not reproduced; else any part not
    measurable -> not measurable (the claim cannot be established as a whole); all reproduced ->
    reproduced; else inconclusive."""
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if any(v == NOT_MEASURABLE for v in verdicts):
        return NOT_MEASURABLE
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE
