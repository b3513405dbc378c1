"""Judging paired values: an interval and a verdict against a threshold, and the figures tables print.

Shared by every experiment: the claims of a compare (`claims`), the gain per text and the study's
cells, and the arms of an arms experiment (`arms`: upcycle, finetune). Pure arithmetic on plain
dicts; the verdict rules themselves are `stats.verdict` / `stats.sized_verdict`.
"""

from __future__ import annotations

import math

from sdmoe.experiments import stats

ONE_PAIR_FIX = "run two seeds or more (--seeds 2)"
TUNED = 1.0  # the rate multiplier of the preset's own (tuned) learning rate


def ci(values) -> dict:
    """The 95% t-interval of the finite values, as a dict (`stats.Interval.to_dict`)."""
    return stats.t_interval(list(values)).to_dict()


def fmt_value(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def reasons(*parts: str) -> str:
    """Several reasons in one line, each once."""
    return "; ".join(dict.fromkeys(p for p in parts if p))


def judge(values: dict, threshold: float, direction: int, missing: str,
          one_pair_fix: str = ONE_PAIR_FIX) -> tuple[dict, str, str]:
    """(interval, verdict, reason) of per-pair values against a threshold.

    Not measurable, with its reason, where the values give no interval: none
    (`missing` says why), one pair, or pairs that all agree exactly (zero spread).
    """
    iv = ci(values.values())
    n = iv["n"]
    if n == 0:
        return iv, stats.NOT_MEASURABLE, missing
    if n == 1:
        pair = next(k for k, v in values.items() if v is not None and math.isfinite(v))
        return iv, stats.NOT_MEASURABLE, f"one pair ({pair}) gives no interval; {one_pair_fix}"
    if not iv["std"]:
        return iv, stats.NOT_MEASURABLE, (f"all {n} pairs gave exactly {fmt_value(iv['mean'], '.4g')}: no spread to "
                                          "form an interval from")
    return iv, stats.verdict(iv["lo"], iv["hi"], threshold, direction), ""


def interval_figure(iv: dict, spec: str = ".3f", unit: str = "", what: str = "pairs", *, empty: str = "no data",
                    one: str = "n=1, no interval", count: bool = True) -> str:
    """An interval (`stats.Interval.to_dict()`) as the tables print it: "mean [lo, hi] (n=N)".

    Without an interval, why: no values (`empty`), one value (`one`), or values that all
    agree (no spread). `count`: whether n follows the interval."""
    if iv.get("n", 0) == 0:
        return empty
    if iv["n"] < 2:
        return f"{fmt_value(iv['mean'], spec)}{unit} ({one})"
    if not iv["std"]:
        return f"{fmt_value(iv['mean'], spec)}{unit} in all {iv['n']} {what} (no spread, no interval)"
    figure = f"{fmt_value(iv['mean'], spec)}{unit} [{fmt_value(iv['lo'], spec)}, {fmt_value(iv['hi'], spec)}]"
    return figure + (f" (n={iv['n']})" if count else "")


def gain_figure(iv: dict, one: str = "one pair, no interval", what: str = "pairs") -> str:
    """A signed gain as the per-text, study and arms tables print it: "+0.050 [+0.025, +0.075]"; "-" for none."""
    return interval_figure(iv, "+.3f", what=what, empty="-", one=one, count=False)


def paired_gains(runs: list[dict], style: str, variant: str, mult: float = TUNED) -> dict[int, float]:
    """{seed: baseline - variant final loss} over the seeds where both `runs.load_run` records of `style` at
    rate multiplier `mult` finished."""
    finals = {v: {r["seed"]: r["final_mean"] for r in runs if r["style"] == style and r["variant"] == v
                  and r["lr_mult"] == mult and r["status"] == "done"} for v in ("baseline", variant)}
    return stats.paired_differences(finals["baseline"], finals[variant])


def gain_row(gains: dict, missing: str = "no finished pair") -> dict:
    """A paired gain judged as claim (a) is: better when the whole 95% interval lies above 0."""
    iv, verdict, why = judge(gains, 0.0, +1, missing)
    return {"gain": iv, "gain_figure": gain_figure(iv), "verdict": verdict, "badge": stats.BADGE[verdict],
            "reason": why, "per_seed": gains}
