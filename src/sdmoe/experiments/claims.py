"""The paper's claims as data, each measured from the compare's run files; every verdict is computed.

`summarize(out, cfg)` reads out/runs/**/{run.json, metrics.jsonl, compare_run.json,
analysis.json} and returns one JSON-able dict: per-run records (curves, step
times, overlap series), the claims table, LR sweep, ablations, per-domain
losses, parameter counts. Each claim of `CLAIMS` is a `Claim`: its statement, how
it is measured, its threshold, and the function from the paired runs (`Paired`)
to its row of the claims table. The report renders that dict; nothing here
imports torch or a model.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmoe.experiments import stats, timing
from sdmoe.experiments.grid import CompareConfig, fmt_mult, plan
from sdmoe.experiments.judging import (  # noqa: F401 - ONE_PAIR_FIX, gain_figure: the judging every table shares
    ONE_PAIR_FIX,
    TUNED,
    fmt_value,
    gain_figure,
    interval_figure,
    judge,
    paired_gains,
)
from sdmoe.experiments.judging import ci as _ci
from sdmoe.experiments.judging import reasons as _reasons
from sdmoe.experiments.runs import load_run, median_step_time, steps_ratio
from sdmoe.experiments.runs import mean as _mean
from sdmoe.experiments.timing import TIMING_FILE
from sdmoe.files import read_json_or_none

PAPER_OVERLAP = 0.1  # the paper's inter-expert similarity of SD-MoE tails
PAPER_STEPS_RATIO = 0.7
# How close a measured figure must be to a number the paper states for "reproduced" (docs/results.md,
# "How verdicts are made"): the whole 95% interval of the steps ratio within 0.7 +- 0.1.
STEPS_RATIO_TOLERANCE = 0.1
STEP_TIME_LIMIT = 1.05
# TUNED (judging): the rate multiplier of the preset's own (tuned) learning rate: every claim but (f) pairs
# runs at it, and the LR sweep's other rates are relative to it.


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str  # the paper's claim
    measure: str  # how this compare measures it
    threshold: float
    direction: int  # +1: measured value must exceed threshold; -1: fall below it
    short: str  # the per-pair value's name: a column of the report's per-pair matrix
    judged_by: Callable[[Claim, Paired], dict] = field(repr=False, compare=False)  # -> its claims-table row
    # a claim that states a number besides its direction: that number, the tolerance around it for "reproduced",
    # and the words of a result in the claimed direction but away from it ("not as stated")
    stated: float | None = None
    tolerance: float = 0.0
    as_stated_words: str = ""

    def row(self, paired: Paired) -> dict:
        """This claim's row of the claims table, measured on the paired runs."""
        return self.judged_by(self, paired)


# -- rows: the claims table's and the gain per text's ----------------------------------------------


def _claim_row(claim: Claim, interval: dict, verdict: str, figure: str, note: str = "", reason: str = "",
               **extra) -> dict:
    """One row of the claims table; `reason`: why the claim is not measurable, or why the machine's
    noise overrules its interval (empty when the interval decides)."""
    return {"claim": claim.key, "statement": claim.statement, "measure": claim.measure, "short": claim.short,
            "figure": figure, "mean": interval.get("mean"), "lo": interval.get("lo"), "hi": interval.get("hi"),
            "n": interval.get("n"), "values": interval.get("values"), "verdict": verdict,
            "badge": stats.BADGE[verdict], "reason": reason, "note": note, **extra}


def text_gain_row(label: str, runs: list[dict], style: str) -> dict[str, Any]:
    """One text's paired gain (baseline - SD-MoE final loss, by seed, at the tuned rate) from a compare's
    run records, judged like claim (a): reproduced when the whole 95% interval lies above 0."""
    iv, verdict, _why = judge(paired_gains(runs, style, "sd-moe"), 0.0, +1, "no finished pair")
    base = next((r for r in runs if r["style"] == style and r["variant"] == "baseline" and r["lr_mult"] == TUNED
                 and r.get("passes") is not None), {})
    return {"text": label, "train_tokens": base.get("train_tokens"), "passes": base.get("passes"), "n": iv["n"],
            "mean": iv["mean"], "lo": iv["lo"], "hi": iv["hi"], "figure": gain_figure(iv), "verdict": verdict,
            "badge": stats.BADGE[verdict]}


def _domains(runs: dict) -> list[str] | None:
    """The validation domains of the compare's text, from the first finished run; None before any finished."""
    for r in runs.values():
        if r["status"] == "done" and r["final"]:
            return [d for d in r["final"] if d != "mean"]
    return None


def step_time_claim(samples: dict[str, dict], claim: Claim) -> dict:
    """Claim (e) from the timing samples ({style: sample} of timing.json).

    The interval is over processes; the verdict it gives stands only where the machine's
    noise (the wider of the two sides' own step-time spread, in units of the ratio) is
    narrower than the ratio's distance to the threshold: else inconclusive.
    """
    fig = timing.analyze(samples)
    if fig is None:
        return _claim_row(claim, _ci([]), stats.NOT_MEASURABLE, "no data",
                          reason="no interleaved timing in this compare (timing.json): it ran with "
                                 "timing_processes = 0, or stopped before timing; run it to the end")
    per_pair, by = fig["per_pair"], fig["by"]
    iv, v, reason = judge(per_pair, claim.threshold, claim.direction, "no timing rounds",
                          "set the compare setting timing_processes to 2 or more")
    noise, distance = fig["noise"], abs(iv["mean"] - claim.threshold)
    noisy = not stats.beyond_noise(v, iv["mean"], claim.threshold, noise)
    if noisy:
        reason = (f"the machine's noise, +-{fmt_value(noise)}x, is wider than the ratio's distance to "
                  f"{claim.threshold:g}, "
                  f"{fmt_value(distance)}x: a second run may land on the other side")
        v = stats.INCONCLUSIVE
    ms = lambda x: fmt_value(1e3 * x, ".2f")  # noqa: E731
    spread = "; ".join(
        (f"{style}: " if len(fig["sides"]) > 1 else "")
        + ", ".join(f"{side} {ms(s['median'])} ms [{ms(s['lo'])}, {ms(s['hi'])}]" for side, s in sides.items())
        for style, sides in fig["sides"].items())
    units = "processes" if by == "process" else "rounds"
    figure = interval_figure(iv, unit="x", what=units)
    if iv["n"] > 1 and iv["std"]:
        figure = figure.replace(f"(n={iv['n']})", f"(n={iv['n']} {units}, {fig['clock_name']})")
    figure += f"; each side's own step time, median [central {timing.SPREAD_COVERAGE:g}% of rounds]: {spread}"
    other = "; ".join(f"{timing.CLOCK_NAMES[c]}'s +-{100 * o['noise_rel']:.1f}% (ratio {fmt_value(o['ratio'])}x)"
                      for c, o in fig["other"].items())
    over = "processes" if by == "process" else "rounds of one process (the spread between processes is not in it)"
    note = (f"on {fig['clock_name']}: each side's own spread (central {timing.SPREAD_COVERAGE:g}% of its rounds) "
            f"+-{100 * fig['noise_rel']:.1f}%" + (f", narrower than {other}" if other else "")
            + f"; interval over {iv['n']} {over}"
            + f"; machine noise +-{fmt_value(noise)}x against the distance to {claim.threshold:g}, "
              f"{fmt_value(distance)}x")
    return _claim_row(claim, iv, v, figure, note, reason, per_pair=per_pair, clock=fig["clock"], noise=noise,
                      noise_limited=noisy, sides=fig["sides"], other_clocks=fig["other"])


# -- the paired runs every claim reads ----------------------------------------------------


def _pair_name(style: str, seed: int) -> str:
    """A pair's name in the per-pair values: runs of one style and seed share weights and data order."""
    return f"{style}/seed{seed}"


@dataclass
class Paired:
    """A compare's runs as the claims read them: by (style, variant, rate multiplier, seed), with the
    compare's settings and its timing samples (timing.json, {style: sample})."""

    cfg: CompareConfig
    runs: dict[str, dict]  # run_id -> `load_run` record, in the plan's order
    timing: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by = {(r["style"], r["variant"], fmt_mult(r["lr_mult"]), r["seed"]): r for r in self.runs.values()}
        self.seeds = range(self.cfg.seeds)
        self.main_keys = [(st, s) for st in self.cfg.styles for s in self.seeds]

    @classmethod
    def read(cls, out: Path, cfg: CompareConfig) -> Paired:
        runs = {s.run_id: load_run(out / "runs" / s.run_id, s) for s in plan(cfg)}
        return cls(cfg, runs, read_json_or_none(out / TIMING_FILE) or {})

    def run(self, style: str, variant: str, seed: int, mult: float = TUNED) -> dict | None:
        return self.by.get((style, variant, fmt_mult(mult), seed))

    def final(self, style: str, variant: str, seed: int, mult: float = TUNED) -> float | None:
        """The run's final mean validation loss (inf if it diverged); None before it ended."""
        r = self.run(style, variant, seed, mult)
        return r["final_mean"] if r and r["status"] in ("done", "diverged") else None

    def paired(self, a_variant: str, b_variant: str, mult: float = TUNED) -> dict[str, float]:
        """{pair: final(a) - final(b)} over the main grid's pairs that both finished."""
        out = {}
        for st, s in self.main_keys:
            a, b = self.final(st, a_variant, s, mult), self.final(st, b_variant, s, mult)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                out[_pair_name(st, s)] = a - b
        return out

    def pairs(self, variant: str = "sd-moe") -> Iterator[tuple[str, dict | None, dict | None]]:
        """(pair, variant's run, baseline's run) at the tuned rate over the main grid; a run not planned is None."""
        for st, s in self.main_keys:
            yield _pair_name(st, s), self.run(st, variant, s), self.run(st, "baseline", s)


# -- the claims, one function each: (claim, paired runs) -> its row -----------------------

NO_PAIR = "no finished baseline / SD-MoE pair at the tuned rate yet"


def _loss_claim(claim: Claim, p: Paired) -> dict:
    """(a) the paired loss difference, with the noise it is read against: the baseline's seed-to-seed
    spread, the same-seed rerun, and whether the LR sweep found a better baseline rate."""
    cfg = p.cfg
    diffs = p.paired("baseline", "sd-moe")
    iv, v, reason = judge(diffs, claim.threshold, claim.direction, NO_PAIR)
    base_spread = {st: stats.std([p.final(st, "baseline", s) for s in p.seeds]) for st in cfg.styles}
    rerun, first = p.final(cfg.styles[0], "baseline-rerun", 0), p.final(cfg.styles[0], "baseline", 0)
    same_seed = abs(rerun - first) if rerun is not None and first is not None else None
    per_style = {st: _ci(v_ for k, v_ in diffs.items() if k.startswith(st + "/")) for st in cfg.styles}
    # A gain over an untuned baseline is no gain: say so when the LR sweep found a better baseline rate.
    untuned = []
    for st in cfg.styles[: cfg.lr_sweep_styles]:
        rates = {m: p.final(st, "baseline", 0, m) for m in cfg.lr_multipliers}
        rates = {m: x for m, x in rates.items() if x is not None and math.isfinite(x)}
        if rates and min(rates, key=rates.get) != TUNED:
            best = min(rates, key=rates.get)
            sd_best = p.final(st, "sd-moe", 0, best)
            untuned.append(f"{st}: the baseline's best rate in the sweep is {fmt_mult(best)}x, not {fmt_mult(TUNED)}x "
                           f"(baseline {rates[best]:.3f}, SD-MoE {fmt_value(sd_best)} there, seed 0): the pairs' "
                           "baseline is not tuned; rerun with --set optim.lr=<that rate>")
    spread = ", ".join(f"{st} {fmt_value(x)}" for st, x in base_spread.items())
    note = ("; ".join(["WARNING " + u for u in untuned] + ["baseline seed-to-seed std: " + spread])
            + "; same-seed rerun of the baseline: " + (f"{same_seed:.4f} nats apart" if same_seed is not None
                                                        else "not run"))
    return _claim_row(claim, iv, v, interval_figure(iv, unit=" nats"), note, reason, per_pair=diffs,
                      per_style=per_style, baseline_std=base_spread, same_seed_noise=same_seed)


def _steps_claim(claim: Claim, p: Paired) -> dict:
    """(b) steps (and wall-clock) for SD-MoE to reach the paired baseline's final loss."""
    ratios, walls, unreached = {}, {}, 0
    for pair, sd, base in p.pairs():
        if not sd or not base or base["status"] != "done" or sd["status"] not in ("done", "diverged"):
            continue
        r, w = steps_ratio(sd, base)
        if r is None:
            unreached += 1
            r = 1.0
        ratios[pair] = r
        if w is not None:
            walls[pair] = w
    iv, v, reason = judge(ratios, claim.threshold, claim.direction, NO_PAIR)
    if v == stats.REPRODUCED:  # fewer steps: now the paper's number, not just the direction
        v = stats.sized_verdict(iv["lo"], iv["hi"], claim.threshold, claim.direction, claim.stated, claim.tolerance)
        if v == stats.INCONCLUSIVE:
            reason = (f"fewer steps, but the interval reaches both inside and outside ~{claim.stated:g}x "
                      f"+- {claim.tolerance:g}: more pairs would tell")
        elif v == stats.NOT_AS_STATED:
            reason = f"{claim.as_stated_words}: the interval lies outside {claim.stated:g}x +- {claim.tolerance:g}"
    wiv = _ci(walls.values())
    note = (f"paper: ~{PAPER_STEPS_RATIO}x (reproduced: the interval within {claim.stated - claim.tolerance:g}-"
            f"{claim.stated + claim.tolerance:g}x); wall-clock to target: {interval_figure(wiv)}")
    if unreached:
        note += f"; {unreached} of {len(ratios)} never reached the baseline's final loss (counted as 1.0)"
    if len(ratios) > 1 and unreached == len(ratios):
        # Every ratio is a lower bound at 1.0: no spread, yet the answer is plain.
        v, reason = stats.NOT_REPRODUCED, ""
    return _claim_row(claim, iv, v, interval_figure(iv, unit="x"), note, reason, per_pair=ratios, wall_ratio=wiv,
                      wall_per_pair=walls, unreached=unreached)


def _overlap_claim(claim: Claim, p: Paired) -> dict:
    """(c) the tails' overlap at the last monitor record: below the threshold, and below the baseline
    experts' own overlap (paired)."""
    tails, gaps, base_ov, k_over_d = {}, {}, {}, None
    for pair, sd, base in p.pairs():
        if sd and sd["monitor"]["tails_overlap"]:
            t = sd["monitor"]["tails_overlap"][-1]
            if t is not None:
                tails[pair] = t
            k_over_d = sd["monitor"]["baseline"] or k_over_d
        if base and base["monitor"]["param_overlap"] and base["monitor"]["param_overlap"][-1] is not None:
            base_ov[pair] = base["monitor"]["param_overlap"][-1]
            k_over_d = base["monitor"]["baseline"] or k_over_d
            if pair in tails:
                gaps[pair] = base_ov[pair] - tails[pair]
    missing = ("no tails' overlap in the monitor records (loop.monitor_every is 0, or later than the runs' "
               "last step)")
    iv, v_abs, r_abs = judge(tails, claim.threshold, claim.direction, missing)
    giv, v_gap, r_gap = judge(gaps, 0.0, +1, missing if not tails else "no baseline experts' overlap to pair with")
    biv = _ci(base_ov.values())
    if k_over_d is not None and k_over_d >= claim.threshold and v_abs != stats.REPRODUCED:
        # Random subspaces already overlap this much: missing the threshold says nothing about the method.
        v_abs = stats.NOT_MEASURABLE
        r_abs = _reasons(r_abs, f"random subspaces already overlap k/d = {fmt_value(k_over_d)} >= {claim.threshold:g} "
                                "at this d, so the absolute threshold cannot be tested; raise d or lower "
                                "loop.monitor_rank")
    v = stats.combine([v_abs, v_gap])
    note = (f"random baseline k/d = {fmt_value(k_over_d)}; baseline experts' overlap {interval_figure(biv)}; "
            f"gap {interval_figure(giv)}")
    return _claim_row(claim, iv, v, interval_figure(iv), note, _reasons(r_abs, r_gap) if v == stats.NOT_MEASURABLE
                      else "", per_pair=tails, more_columns={"gap, baseline experts - tails": gaps},
                      baseline_overlap=biv, gap=giv, random_baseline=k_over_d)


def _specialisation_claim(claim: Claim, p: Paired) -> dict:
    """(d) I(expert; domain) of the post-hoc analysis, paired; and the de facto shared experts."""
    mi, shared = {}, {}
    for pair, sd, base in p.pairs():
        if sd and base and sd["specialisation"] and base["specialisation"]:
            mi[pair] = sd["specialisation"]["domain_mi_normalized"] - base["specialisation"]["domain_mi_normalized"]
            shared[pair] = base["specialisation"]["shared_experts"] - sd["specialisation"]["shared_experts"]
    iv, v, reason = judge(mi, claim.threshold, claim.direction, "no post-hoc analysis (the compare ran with analyze "
                          "off)" if not p.cfg.analyze else "no analysed baseline / SD-MoE pair yet")
    domains = _domains(p.runs)
    if domains is not None and len(domains) < 2:
        # I(expert; domain) of a single domain is 0 for every model: nothing to compare.
        v, reason = stats.NOT_MEASURABLE, (
            f"one domain in the text ({', '.join(domains) or '-'}): I(expert; domain) is 0 for any router; give "
            "two or more domains (--text with one subdirectory per domain, or two files)")
    note = (f"fewer de facto shared experts (baseline - SD-MoE, all layers): "
            f"{interval_figure(_ci(shared.values()), '.2f')}" if mi else "")
    return _claim_row(claim, iv, v, interval_figure(iv), note, reason, per_pair=mi,
                      shared_experts_diff=_ci(shared.values()), domains=domains)


def _step_time_claim(claim: Claim, p: Paired) -> dict:
    """(e) from the interleaved timing samples (timing.json), not from the runs' own step times."""
    return step_time_claim(p.timing, claim)


def _top_rate_claim(claim: Claim, p: Paired) -> dict:
    """(f) at the sweep's top rate: SD-MoE does not diverge, and loses less than the baseline going there."""
    cfg = p.cfg
    top = max(float(m) for m in cfg.lr_multipliers)
    sweep_keys = [(st, s) for st in cfg.styles[: cfg.lr_sweep_styles] for s in list(p.seeds)[: cfg.lr_sweep_seeds]]
    diverged = {"sd-moe": 0, "baseline": 0}
    runs_at_top = {"sd-moe": 0, "baseline": 0}
    tolerance = {}
    for st, s in sweep_keys:
        for variant in ("sd-moe", "baseline"):
            r = p.run(st, variant, s, top)
            if r and r["status"] in ("done", "diverged"):
                runs_at_top[variant] += 1
                diverged[variant] += r["status"] == "diverged"
        sd_lo, sd_hi = p.final(st, "sd-moe", s), p.final(st, "sd-moe", s, top)
        b_lo, b_hi = p.final(st, "baseline", s), p.final(st, "baseline", s, top)
        if None not in (sd_lo, sd_hi, b_lo, b_hi) and all(math.isfinite(x) for x in (sd_lo, sd_hi, b_lo, b_hi)):
            tolerance[_pair_name(st, s)] = (b_hi - b_lo) - (sd_hi - sd_lo)
    iv, v_tol, r_tol = judge(tolerance, 0.0, +1, "no pair finished at both 1x and the top rate on both sides "
                             "(a diverged run has no loss)", "the top rate ran one seed; raise the compare "
                             "setting lr_sweep_seeds to 2 or more")
    note = ""
    if top < 4 or "sd-moe" not in cfg.lr_sweep_variants or "baseline" not in cfg.lr_sweep_variants or not sweep_keys:
        v, reason = stats.NOT_MEASURABLE, (
            "the compare ran no 4x learning rate for SD-MoE and the baseline (lr_multipliers up to "
            f"{fmt_mult(top)}x, lr_sweep_styles {cfg.lr_sweep_styles}); add 4 to --lr-multipliers")
    elif runs_at_top["sd-moe"] == 0:
        v, reason = stats.NOT_MEASURABLE, f"no finished SD-MoE run at {fmt_mult(top)}x yet"
    else:
        stable = stats.NOT_REPRODUCED if diverged["sd-moe"] else stats.REPRODUCED
        v = stats.combine([stable, v_tol])
        reason = r_tol if v == stats.NOT_MEASURABLE else ""
        note = (f"at {fmt_mult(top)}x: SD-MoE diverged in {diverged['sd-moe']} of {runs_at_top['sd-moe']} runs, "
                f"baseline in {diverged['baseline']} of {runs_at_top['baseline']}; figure: baseline's loss increase "
                f"minus SD-MoE's (nats)")
    return _claim_row(claim, iv, v, interval_figure(iv, unit=" nats"), note, reason, per_pair=tolerance,
                      diverged=diverged, top_lr_mult=top)


def _control_claim(claim: Claim, p: Paired) -> dict:
    """(g) SD-MoE against the control: the same reparameterisation with plain gradients."""
    cfg = p.cfg
    if "control" in set(cfg.variants) | set(cfg.lr_sweep_variants) | set(cfg.ablations):
        diffs = p.paired("control", "sd-moe")
        iv, v, reason = judge(diffs, claim.threshold, claim.direction, "no finished control / SD-MoE pair yet")
        note = "control - baseline: " + interval_figure(_ci(p.paired("control", "baseline").values()))
    else:
        diffs, iv, v, note = {}, _ci([]), stats.NOT_MEASURABLE, ""
        reason = "the compare ran no control variant; add control to --variants"
    return _claim_row(claim, iv, v, interval_figure(iv, unit=" nats"), note, reason, per_pair=diffs)



CLAIMS = (
    Claim("a", "SD-MoE lowers validation loss vs the plain MoE",
          "paired difference baseline - SD-MoE of final mean validation loss (nats), per style x seed at the tuned rate",
          0.0, +1, "loss, baseline - SD-MoE (nats)", _loss_claim),
    Claim("b", "SD-MoE reaches the baseline's final loss in ~0.7x the steps",
          "steps at which SD-MoE's eval curve (linear between evaluations, warm-up counted) reaches the paired "
          "baseline's final loss, / the baseline's steps; not reached counts as 1.0 (a lower bound)",
          1.0, -1, "steps to the baseline's loss / its steps", _steps_claim,
          stated=PAPER_STEPS_RATIO, tolerance=STEPS_RATIO_TOLERANCE, as_stated_words="fewer steps, not ~0.7x"),
    Claim("c", "SD-MoE tails' inter-expert spectral similarity < 0.1, below the baseline's",
          "mean off-diagonal top-k subspace overlap of the tails at the last monitor record, and paired "
          "baseline expert overlap - SD-MoE tails overlap", PAPER_OVERLAP, -1, "tails' overlap", _overlap_claim),
    Claim("d", "experts specialise more (domain information, fewer de facto shared experts)",
          "paired difference SD-MoE - baseline of the normalised mutual information I(expert; domain), "
          "mean over layers, on the validation text", 0.0, +1, "I(expert; domain), SD-MoE - baseline",
          _specialisation_claim),
    Claim("e", "minimal extra compute (step time <= ~1.05x)",
          "SD-MoE / baseline step time, the two training steps interleaved A B A B in several fresh processes "
          "(split at step 0); one process's median ratio over its rounds is one sample; on process CPU time "
          "when wall time spreads more; inconclusive while either side's own spread is wider than the ratio's "
          "distance to the threshold", STEP_TIME_LIMIT, -1, "step time, SD-MoE / baseline", _step_time_claim),
    Claim("f", "stable at 4x the tuned learning rate",
          "no divergence at 4x, and the loss lost going 1x -> 4x smaller than the baseline's (paired, nats)",
          0.0, +1, "loss lost 1x -> 4x, baseline - SD-MoE (nats)", _top_rate_claim),
    Claim("g", "the gain is the spectral split's, not the reparameterisation's",
          "paired difference control (W_s + T_i, plain gradients) - SD-MoE of final mean validation loss", 0.0, +1,
          "loss, control - SD-MoE (nats)", _control_claim),
)
CLAIMS_BY_KEY = {c.key: c for c in CLAIMS}


def summarize(out: Path, cfg: CompareConfig) -> dict[str, Any]:
    """The compare in `out` as one JSON-able dict: the headline, every claim's row, the tables, every run."""
    p = Paired.read(out, cfg)
    runs = p.runs
    claims = [claim.row(p) for claim in CLAIMS]
    n_done = sum(r["status"] == "done" for r in runs.values())
    lr = next((r["lr"] for r in runs.values() if r["variant"] == "baseline" and r["lr_mult"] == TUNED and r["lr"]),
              None)
    return {
        "headline": headline(claims, cfg, lr, n_done, len(runs)),
        "config": cfg.to_dict(),
        "n_runs": len(runs),
        "n_done": n_done,
        "n_diverged": sum(r["status"] == "diverged" for r in runs.values()),
        "claims": claims,
        "variants": _variant_table(p),
        "domains": _domain_table(p),
        "lr_sweep": _lr_table(p),
        "ablations": _ablation_table(p),
        "parameters": _param_table(p),
        "runs": list(runs.values()),
    }


def headline(claims: list[dict], cfg: CompareConfig, lr: float | None, n_done: int, n_runs: int) -> str:
    """One sentence: what the compare found, from the verdicts (the first line of the report and the summary)."""
    groups = {v: [c["claim"] for c in claims if c["verdict"] == v] for v in stats.VERDICTS}
    keys = lambda ks: f" ({', '.join(ks)})" if ks else ""  # noqa: E731
    parts = [f"{len(groups[stats.REPRODUCED])} of {len(claims)} of the paper's claims reproduced"
             f"{keys(groups[stats.REPRODUCED])}"]
    for v, ks in groups.items():
        if v == stats.NOT_AS_STATED and ks:  # in the claimed direction, away from the stated number: its words
            words = [f"{k}: {CLAIMS_BY_KEY[k].as_stated_words}" for k in ks]
            parts.append(f"{len(ks)} in the claimed direction but not the stated size ({'; '.join(words)})")
        elif v != stats.REPRODUCED and ks:
            parts.append(f"{len(ks)} {v}{keys(ks)}")
    setting = [f"train preset {cfg.preset}", ", ".join(cfg.styles), f"{cfg.seeds} seed{'s' * (cfg.seeds != 1)}"]
    if lr:
        setting.append(f"lr {lr:g}")
    a = next((c for c in claims if c["claim"] == "a"), None)
    signed = lambda x: f"{x:+.3f}"  # noqa: E731 - "-0.000" kept: a bound just below 0 must not read as above it
    loss = ""
    if a and a["n"]:
        interval = (f" [{signed(a['lo'])}, {signed(a['hi'])}]" if a["lo"] is not None and math.isfinite(a["lo"])
                    else " (no interval)")
        loss = (f"; validation loss baseline - SD-MoE {signed(a['mean'])} nats{interval} over {a['n']} "
                f"pair{'s' * (a['n'] != 1)}")
    done = f"; {n_done} of {n_runs} runs done so far" if n_done < n_runs else ""
    return f"SD-MoE vs the plain MoE ({', '.join(setting)}): {', '.join(parts)}{loss}{done}."


def _variant_table(p: Paired) -> list[dict]:
    rows = []
    for st in p.cfg.styles:
        for variant in p.cfg.variants:
            finals = [r["final_mean"] for s in p.seeds if (r := p.run(st, variant, s))
                      and r["status"] in ("done", "diverged")]
            iv = _ci(finals)
            walls = [r["wall_s"] for s in p.seeds if (r := p.run(st, variant, s)) and r["wall_s"]]
            rows.append({"style": st, "variant": variant, "n": iv["n"], "val_loss": iv["mean"], "lo": iv["lo"],
                         "hi": iv["hi"], "std": iv["std"], "wall_s": _mean(walls)})
    return rows


def _domain_table(p: Paired) -> list[dict]:
    """Per style, domain and variant: mean loss, perplexity and its CI over seeds; paired diff vs baseline."""
    rows = []
    for st in p.cfg.styles:
        domains = []
        for s in p.seeds:
            r = p.run(st, "baseline", s)
            if r and r["final"]:
                domains = [d for d in r["final"] if d != "mean"]
                break
        for d in domains:
            for variant in p.cfg.variants:
                vals, diffs = [], []
                for s in p.seeds:
                    r, b = p.run(st, variant, s), p.run(st, "baseline", s)
                    if r and r["status"] == "done" and r["final"] and d in r["final"]:
                        vals.append(r["final"][d])
                        if variant != "baseline" and b and b["status"] == "done" and b["final"]:
                            diffs.append(b["final"][d] - r["final"][d])
                iv, dv = _ci(vals), _ci(diffs)
                ppl = lambda x: math.exp(min(x, 50)) if x is not None and math.isfinite(x) else math.nan  # noqa: E731
                rows.append({"style": st, "domain": d, "variant": variant, "n": iv["n"], "loss": iv["mean"],
                             "ppl": ppl(iv["mean"]), "ppl_lo": ppl(iv["lo"]), "ppl_hi": ppl(iv["hi"]),
                             "gain_vs_baseline": dv["mean"] if variant != "baseline" else None,
                             "gain_lo": dv["lo"] if variant != "baseline" else None,
                             "gain_hi": dv["hi"] if variant != "baseline" else None})
    return rows


def _lr_table(p: Paired) -> list[dict]:
    cfg = p.cfg
    rows = []
    for st in cfg.styles[: cfg.lr_sweep_styles]:
        sweep_seeds = list(p.seeds)[: cfg.lr_sweep_seeds]
        for variant in cfg.lr_sweep_variants:
            for m in sorted(float(x) for x in cfg.lr_multipliers):
                rs = [p.run(st, variant, s, m) for s in sweep_seeds]
                rs = [r for r in rs if r and r["status"] in ("done", "diverged")]
                finite = [r["final_mean"] for r in rs if math.isfinite(r["final_mean"])]
                rows.append({"style": st, "variant": variant, "lr_mult": m, "lr": rs[0]["lr"] if rs else None,
                             "n": len(rs), "diverged": sum(r["status"] == "diverged" for r in rs),
                             "val_loss": _mean(finite)})
        base_rows = [r for r in rows if r["style"] == st and r["variant"] == "baseline" and math.isfinite(r["val_loss"])]
        if base_rows:
            best = min(base_rows, key=lambda r: r["val_loss"])
            for r in rows:
                if r["style"] == st:
                    r["baseline_best_mult"] = best["lr_mult"]
    return rows


def _ablation_table(p: Paired) -> list[dict]:
    cfg = p.cfg
    names = [v for v in cfg.variants if v != "baseline"] + [f"rank-{r}" for r in cfg.rank_sweep] + list(cfg.ablations)
    rows = []
    for variant in dict.fromkeys(names):
        vs_base, vs_sd, tails, times, n = [], [], [], [], 0
        for st, s in p.main_keys:
            r, b, sd = (p.run(st, v, s) for v in (variant, "baseline", "sd-moe"))
            if not r or r["status"] not in ("done", "diverged"):
                continue
            n += 1
            if b and b["status"] == "done" and math.isfinite(r["final_mean"]):
                vs_base.append(b["final_mean"] - r["final_mean"])
                if r["status"] == "done" and b["status"] == "done":
                    t = median_step_time(r, r["split_step"]) / median_step_time(b, r["split_step"])
                    times.append(t)
            if sd and sd is not r and sd["status"] == "done" and math.isfinite(r["final_mean"]):
                vs_sd.append(sd["final_mean"] - r["final_mean"])
            if r["monitor"]["tails_overlap"] and r["monitor"]["tails_overlap"][-1] is not None:
                tails.append(r["monitor"]["tails_overlap"][-1])
        if n == 0:
            continue
        a, c = _ci(vs_base), _ci(vs_sd)
        rows.append({"variant": variant, "n": n, "gain_vs_baseline": a["mean"], "lo": a["lo"], "hi": a["hi"],
                     "verdict": stats.verdict(a["lo"], a["hi"], 0.0, +1),
                     "gain_vs_sd_moe": c["mean"] if variant != "sd-moe" else None,
                     "tails_overlap": _mean(tails), "step_time_ratio": _mean(times)})
    return rows


def _param_table(p: Paired) -> list[dict]:
    rows, seen = [], set()
    for (st, variant, _mult, _s), r in sorted(p.by.items(), key=lambda kv: str(kv[0])):
        if (st, variant) in seen or r["trainable_parameters"] is None:
            continue
        seen.add((st, variant))
        after = r["trainable_parameters_after_split"] if r["method"] == "sd-moe" else r["trainable_parameters"]
        rows.append({"style": st, "variant": variant, "at_start": r["trainable_parameters"],
                     "while_training": after,
                     "added": (after - r["trainable_parameters"]) if after is not None else None})
    return rows


# -- plain-text outputs ------------------------------------------------------------------


def summary_csv(summary: dict) -> str:
    """One row per run: what a spreadsheet needs to redo the statistics."""
    buf = io.StringIO()
    cols = ["run_id", "style", "variant", "seed", "lr_mult", "status", "final_mean", "steps", "wall_s",
            "median_step_time", "trainable_parameters", "trainable_parameters_after_split", "tails_overlap_final",
            "param_overlap_final", "domain_mi_normalized", "shared_experts"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in summary["runs"]:
        sp = r.get("specialisation") or {}
        w.writerow({
            **{c: r.get(c) for c in cols if c in r},
            "median_step_time": median_step_time(r, r.get("split_step")) if r["log"]["step"] else None,
            "tails_overlap_final": (r["monitor"]["tails_overlap"] or [None])[-1],
            "param_overlap_final": (r["monitor"]["param_overlap"] or [None])[-1],
            "domain_mi_normalized": sp.get("domain_mi_normalized"),
            "shared_experts": sp.get("shared_experts"),
        })
    return buf.getvalue()


def summary_text(summary: dict) -> str:
    """The terminal summary: the headline first, then one line per claim."""
    lines = [summary["headline"]]
    if summary.get("per_text"):  # the gain per text first: the answer a user with their own text wants
        lines.append(summary["per_text_sentence"])
        for r in summary["per_text"]:
            passes = f"{r['passes']:.2f} passes" if r.get("passes") is not None else "passes -"
            lines.append(f"  {r['text']:<24} {passes:<13} gain {r['figure']:<26} {r['verdict']}")
    lines.append(f"compare: {summary['n_done']} of {summary['n_runs']} runs done"
                 + (f", {summary['n_diverged']} diverged" if summary["n_diverged"] else ""))
    done = [r for r in summary["runs"] if r["status"] == "done" and r.get("unigram_entropy")]
    for variant in ("baseline", "sd-moe"):
        finals = [r["final_mean"] for r in done if r["variant"] == variant and r["lr_mult"] == TUNED]
        if finals:
            lines.append(f"  {variant}: mean validation loss {statistics.mean(finals):.3f} nats/token over "
                         f"{len(finals)} runs; unigram entropy of the corpus {done[0]['unigram_entropy']:.3f} nats/token")
    for c in summary["claims"]:
        line = f"  ({c['claim']}) {c['verdict'].upper():<15} {c['statement']}: {c['figure']}"
        lines.append(line + (f"\n      {c['reason']}" if c.get("reason") else ""))
    return "\n".join(lines)
