"""The paper's claims as data, each measured from the compare's run files; every verdict is computed.

`summarize(out, cfg)` reads out/runs/**/{run.json, metrics.jsonl, compare_run.json,
analysis.json} and returns one JSON-able dict: per-run records (curves, step
times, overlap series), the claims table, LR sweep, ablations, per-domain
losses, parameter counts. The report renders that dict; nothing here imports
torch or a model.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmoe.experiments import stats
from sdmoe.experiments.grid import CompareConfig, fmt_mult, plan
from sdmoe.files import read_json, read_jsonl

PAPER_OVERLAP = 0.1  # the paper's inter-expert similarity of SD-MoE tails
PAPER_STEPS_RATIO = 0.7
STEP_TIME_LIMIT = 1.05


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str  # the paper's claim
    measure: str  # how this compare measures it
    threshold: float
    direction: int  # +1: measured value must exceed threshold; -1: fall below it


CLAIMS = (
    Claim("a", "SD-MoE lowers validation loss vs the plain MoE",
          "paired difference baseline - SD-MoE of final mean validation loss (nats), per style x seed at the tuned rate",
          0.0, +1),
    Claim("b", "SD-MoE reaches the baseline's final loss in ~0.7x the steps",
          "steps at which SD-MoE's eval curve (linear between evaluations, warm-up counted) reaches the paired "
          "baseline's final loss, / the baseline's steps; not reached counts as 1.0 (a lower bound)",
          1.0, -1),
    Claim("c", "SD-MoE tails' inter-expert spectral similarity < 0.1, below the baseline's",
          "mean off-diagonal top-k subspace overlap of the tails at the last monitor record, and paired "
          "baseline expert overlap - SD-MoE tails overlap", PAPER_OVERLAP, -1),
    Claim("d", "experts specialise more (domain information, fewer de facto shared experts)",
          "paired difference SD-MoE - baseline of the normalised mutual information I(expert; domain), "
          "mean over layers, on the validation text", 0.0, +1),
    Claim("e", "minimal extra compute (step time <= ~1.05x)",
          "SD-MoE / baseline median step time over the log windows after the split, per pair", STEP_TIME_LIMIT, -1),
    Claim("f", "stable at 4x the tuned learning rate",
          "no divergence at 4x, and the loss lost going 1x -> 4x smaller than the baseline's (paired, nats)",
          0.0, +1),
    Claim("g", "the gain is the spectral split's, not the reparameterisation's",
          "paired difference control (W_s + T_i, plain gradients) - SD-MoE of final mean validation loss", 0.0, +1),
)


# -- reading runs -------------------------------------------------------------------


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(xs) / len(xs) if xs else math.nan


def _tails_overlap(rec: dict) -> float | None:
    """The SD-MoE tails' mean overlap in a monitor record, whatever shape it was logged in."""
    vals = []
    for key, v in rec.items():
        if isinstance(v, (int, float)) and "tail" in key and "overlap" in key:
            if key.endswith("/mean"):
                return float(v)
            vals.append(float(v))
    for layer in rec.get("layers", []) or []:
        if isinstance(layer, dict) and isinstance(layer.get("tails_overlap"), dict):
            vals.extend(float(x) for x in layer["tails_overlap"].values() if x is not None)
    sd = rec.get("sdmoe")
    if isinstance(sd, dict) and not vals:
        t = _tails_overlap(sd)
        if t is not None:
            return t
    return _mean(vals) if vals else None


def load_run(run_dir: Path, spec=None) -> dict[str, Any]:
    """One run's figures from its files (missing files give empty fields, never an error)."""
    run = read_json(run_dir / "run.json") or {}
    mine = read_json(run_dir / "compare_run.json") or {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    analysis = read_json(run_dir / "analysis.json")
    cfg = run.get("config", {})
    status = "missing"
    if run:
        status = "done" if run.get("status") == "done" else "running"
    if mine.get("status") == "diverged":
        status = "diverged"
    evals = sorted((r for r in metrics if r.get("event") == "eval"), key=lambda r: r["step"])
    logs = sorted((r for r in metrics if "step_time" in r and "event" not in r), key=lambda r: r["step"])
    monitors = sorted((r for r in metrics if r.get("event") == "monitor"), key=lambda r: r["step"])
    start = next((r for r in metrics if r.get("event") == "start"), {})
    split = next((r for r in metrics if r.get("event") == "split"), None)
    final = run.get("val_loss") if status == "done" else None
    if status == "diverged":
        final = {"mean": math.inf}
    spec_fields = {k: getattr(spec, k) for k in ("style", "variant", "seed", "lr_mult")} if spec else \
        {k: mine.get(k) for k in ("style", "variant", "seed", "lr_mult")}
    rec: dict[str, Any] = {
        "run_id": spec.run_id if spec else mine.get("run_id", str(run_dir)),
        **spec_fields,
        "status": status,
        "method": cfg.get("method"),
        "steps": cfg.get("loop", {}).get("steps"),
        "log_every": cfg.get("loop", {}).get("log_every"),
        "split_step": cfg.get("sdmoe", {}).get("split_step") if cfg.get("method") == "sd-moe" else None,
        "lr": cfg.get("optim", {}).get("lr"),
        "final": final,
        "final_mean": (final or {}).get("mean", math.nan) if final else math.nan,
        "curve": {"step": [r["step"] for r in evals], "mean": [r["val"]["mean"] for r in evals],
                  "domains": {d: [r["val"].get(d) for r in evals] for d in (evals[0]["val"] if evals else {})
                              if d != "mean"}},
        "log": {"step": [r["step"] for r in logs], "step_time": [r["step_time"] for r in logs],
                "loss": [r.get("loss") for r in logs]},
        "monitor": {"step": [r["step"] for r in monitors],
                    "param_overlap": [r.get("param_overlap/mean") for r in monitors],
                    "tails_overlap": [_tails_overlap(r) for r in monitors],
                    "baseline": next((r.get("overlap_baseline") for r in monitors if r.get("overlap_baseline")), None)},
        "trainable_parameters": start.get("trainable_parameters"),
        "unigram_entropy": start.get("unigram_entropy"),
        "trainable_parameters_after_split": (split or {}).get("trainable_parameters")
        or mine.get("trainable_parameters_after_split"),
        "wall_s": mine.get("wall_s"),
        "specialisation": _specialisation(analysis),
    }
    if split is not None:
        rec["split_logits_rel_change"] = split.get("logits_rel_change")
    return rec


def _specialisation(analysis: dict | None) -> dict | None:
    if not analysis:
        return None
    fun = analysis.get("functional") or []
    if not fun:
        return None
    return {
        "domain_mi_normalized": _mean(f.get("domain_mi_normalized") for f in fun),
        "domain_mi_nats": _mean(f.get("domain_mi_nats") for f in fun),
        "shared_experts": sum(len(f.get("shared_experts") or []) for f in fun),
        "load_entropy": _mean(f.get("load_entropy") for f in fun),
        "output_cosine_mean": _mean(f.get("output_cosine_mean") for f in fun),
    }


# -- per-pair measurements ------------------------------------------------------------


def median_step_time(run: dict, after: int | None) -> float:
    """Median per-step time over log windows that start at or after step `after`."""
    every = run.get("log_every") or 1
    vals = [t for s, t in zip(run["log"]["step"], run["log"]["step_time"])
            if after is None or s - every >= after]
    return statistics.median(vals) if vals else math.nan


def steps_ratio(sd: dict, base: dict) -> tuple[float | None, float | None]:
    """(steps ratio, wall-clock ratio) for SD-MoE to reach the baseline's final loss; None when never."""
    target, n = base["final_mean"], base["steps"] or (base["curve"]["step"][-1] if base["curve"]["step"] else None)
    if not (n and math.isfinite(target)) or sd["status"] != "done":
        return None, None
    cross = stats.crossing_step(sd["curve"]["step"], sd["curve"]["mean"], target, max_step=n)
    if cross is None:
        return None, None
    xs, ys = stats.cumulative_time(sd["log"]["step"], sd["log"]["step_time"])
    bxs, bys = stats.cumulative_time(base["log"]["step"], base["log"]["step_time"])
    wall = stats.interp(xs, ys, cross) / stats.interp(bxs, bys, n) if len(bxs) > 1 and len(xs) > 1 else None
    return cross / n, wall


# -- the summary ------------------------------------------------------------------------


def _ci(values) -> dict:
    return stats.t_interval(list(values)).to_dict()


def _claim_row(claim: Claim, interval: dict, verdict: str, figure: str, note: str = "", **extra) -> dict:
    return {"claim": claim.key, "statement": claim.statement, "measure": claim.measure, "figure": figure,
            "mean": interval.get("mean"), "lo": interval.get("lo"), "hi": interval.get("hi"), "n": interval.get("n"),
            "values": interval.get("values"), "verdict": verdict, "badge": stats.BADGE[verdict], "note": note, **extra}


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _figure(iv: dict, spec=".3f", unit: str = "") -> str:
    if iv.get("n", 0) == 0:
        return "no data"
    if iv["n"] < 2:
        return f"{_fmt(iv['mean'], spec)}{unit} (n=1, no interval)"
    return f"{_fmt(iv['mean'], spec)}{unit} [{_fmt(iv['lo'], spec)}, {_fmt(iv['hi'], spec)}] (n={iv['n']})"


def summarize(out: Path, cfg: CompareConfig) -> dict[str, Any]:
    specs = plan(cfg)
    runs = {s.run_id: load_run(out / "runs" / s.run_id, s) for s in specs}
    by = {(r["style"], r["variant"], fmt_mult(r["lr_mult"]), r["seed"]): r for r in runs.values()}

    def final(style, variant, mult, seed):
        r = by.get((style, variant, fmt_mult(mult), seed))
        return r["final_mean"] if r and r["status"] in ("done", "diverged") else None

    seeds = range(cfg.seeds)
    main_keys = [(st, s) for st in cfg.styles for s in seeds]

    def paired(a_variant, b_variant, mult=1.0, keys=None):
        """{(style, seed): final(a) - final(b)} for the pairs both finished."""
        out_ = {}
        for st, s in keys or main_keys:
            a, b = final(st, a_variant, mult, s), final(st, b_variant, mult, s)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                out_[f"{st}/seed{s}"] = a - b
        return out_

    claims = []
    has = set(cfg.variants) | set(cfg.lr_sweep_variants) | set(cfg.ablations)

    # (a) loss
    ca = CLAIMS[0]
    diffs = paired("baseline", "sd-moe")
    iv = _ci(diffs.values())
    base_spread = {st: stats.std([final(st, "baseline", 1.0, s) for s in seeds]) for st in cfg.styles}
    rerun, first = final(cfg.styles[0], "baseline-rerun", 1.0, 0), final(cfg.styles[0], "baseline", 1.0, 0)
    same_seed = abs(rerun - first) if rerun is not None and first is not None else None
    per_style = {st: _ci(v for k, v in diffs.items() if k.startswith(st + "/")) for st in cfg.styles}
    # A gain over an untuned baseline is no gain: say so when the LR sweep found a better baseline rate.
    untuned = []
    for st in cfg.styles[: cfg.lr_sweep_styles]:
        rates = {m: final(st, "baseline", m, 0) for m in cfg.lr_multipliers}
        rates = {m: v for m, v in rates.items() if v is not None and math.isfinite(v)}
        if rates and min(rates, key=rates.get) != 1.0:
            best = min(rates, key=rates.get)
            sd_best = final(st, "sd-moe", best, 0)
            untuned.append(f"{st}: the baseline's best rate in the sweep is {fmt_mult(best)}x, not 1x "
                           f"(baseline {rates[best]:.3f}, SD-MoE {_fmt(sd_best)} there, seed 0): the pairs' "
                           "baseline is not tuned; rerun with --set optim.lr=<that rate>")
    claims.append(_claim_row(ca, iv, stats.verdict(iv["lo"], iv["hi"], ca.threshold, ca.direction),
                             _figure(iv, unit=" nats"),
                             "; ".join(["WARNING " + u for u in untuned]
                                       + ["baseline seed-to-seed std: "
                                          + ", ".join(f"{st} {_fmt(v)}" for st, v in base_spread.items())])
                             + ("; same-seed rerun of the baseline: " + (f"{same_seed:.4f} nats apart" if same_seed
                                is not None else "not run")),
                             per_pair=diffs, per_style=per_style, baseline_std=base_spread, same_seed_noise=same_seed))

    # (b) steps / wall-clock to target
    cb = CLAIMS[1]
    ratios, walls, unreached = {}, {}, 0
    for st, s in main_keys:
        sd, base = by.get((st, "sd-moe", "1", s)), by.get((st, "baseline", "1", s))
        if not sd or not base or base["status"] != "done" or sd["status"] not in ("done", "diverged"):
            continue
        r, w = steps_ratio(sd, base)
        if r is None:
            unreached += 1
            r = 1.0
        ratios[f"{st}/seed{s}"] = r
        if w is not None:
            walls[f"{st}/seed{s}"] = w
    iv = _ci(ratios.values())
    wiv = _ci(walls.values())
    note = f"paper: ~{PAPER_STEPS_RATIO}x; wall-clock to target: {_figure(wiv)}"
    if unreached:
        note += f"; {unreached} of {len(ratios)} never reached the baseline's final loss (counted as 1.0)"
    claims.append(_claim_row(cb, iv, stats.verdict(iv["lo"], iv["hi"], cb.threshold, cb.direction), _figure(iv, unit="x"),
                             note, per_pair=ratios, wall_ratio=wiv, wall_per_pair=walls, unreached=unreached))

    # (c) tails' overlap
    cc = CLAIMS[2]
    tails, gaps, base_ov, k_over_d = {}, {}, {}, None
    for st, s in main_keys:
        sd, base = by.get((st, "sd-moe", "1", s)), by.get((st, "baseline", "1", s))
        if sd and sd["monitor"]["tails_overlap"]:
            t = sd["monitor"]["tails_overlap"][-1]
            if t is not None:
                tails[f"{st}/seed{s}"] = t
            k_over_d = sd["monitor"]["baseline"] or k_over_d
        if base and base["monitor"]["param_overlap"] and base["monitor"]["param_overlap"][-1] is not None:
            base_ov[f"{st}/seed{s}"] = base["monitor"]["param_overlap"][-1]
            k_over_d = base["monitor"]["baseline"] or k_over_d
            if f"{st}/seed{s}" in tails:
                gaps[f"{st}/seed{s}"] = base_ov[f"{st}/seed{s}"] - tails[f"{st}/seed{s}"]
    iv, giv, biv = _ci(tails.values()), _ci(gaps.values()), _ci(base_ov.values())
    v = stats.combine([stats.verdict(iv["lo"], iv["hi"], cc.threshold, cc.direction),
                       stats.verdict(giv["lo"], giv["hi"], 0.0, +1)])
    note = f"random baseline k/d = {_fmt(k_over_d)}; baseline experts' overlap {_figure(biv)}; gap {_figure(giv)}"
    if not tails:
        v, note = stats.INCONCLUSIVE, "no tails' overlap in the monitor records (trainer does not log it); " + note
    elif k_over_d is not None and k_over_d >= cc.threshold and v == stats.NOT_REPRODUCED:
        v = stats.INCONCLUSIVE
        note += f"; at this scale random subspaces already overlap {_fmt(k_over_d)} >= {cc.threshold}: " \
                "the absolute threshold cannot be met, raise d or lower loop.monitor_rank"
    claims.append(_claim_row(cc, iv, v, _figure(iv), note, per_pair=tails, baseline_overlap=biv, gap=giv,
                             random_baseline=k_over_d))

    # (d) specialisation
    cd = CLAIMS[3]
    mi, shared = {}, {}
    for st, s in main_keys:
        sd, base = by.get((st, "sd-moe", "1", s)), by.get((st, "baseline", "1", s))
        if sd and base and sd["specialisation"] and base["specialisation"]:
            mi[f"{st}/seed{s}"] = sd["specialisation"]["domain_mi_normalized"] - base["specialisation"]["domain_mi_normalized"]
            shared[f"{st}/seed{s}"] = base["specialisation"]["shared_experts"] - sd["specialisation"]["shared_experts"]
    iv, siv = _ci(mi.values()), _ci(shared.values())
    v = stats.verdict(iv["lo"], iv["hi"], cd.threshold, cd.direction) if mi else stats.INCONCLUSIVE
    claims.append(_claim_row(cd, iv, v, _figure(iv),
                             ("no post-hoc analysis (compare ran with analyze off)" if not mi else
                              f"fewer de facto shared experts (baseline - SD-MoE, all layers): {_figure(siv, '.2f')}"),
                             per_pair=mi, shared_experts_diff=siv))

    # (e) step time: from the interleaved in-process timing when the compare made one
    # (rounds are the paired samples), else run against run from the metrics.
    ce = CLAIMS[4]
    times = {}
    timing = read_json(out / "timing.json") or {}
    for st, t in timing.items():
        for i, (a, b) in enumerate(zip(t.get("sd-moe", []), t.get("baseline", []))):
            times[f"{st}/round{i}"] = a / b
    how = ("interleaved steps in one process (timing.json), ratio per round" if times else
           "run against run on a shared machine: noisy; control's ratio in the ablation table")
    for st, s in ([] if times else main_keys):
        sd, base = by.get((st, "sd-moe", "1", s)), by.get((st, "baseline", "1", s))
        if sd and base and sd["status"] == "done" and base["status"] == "done":
            after = sd["split_step"]
            a, b = median_step_time(sd, after), median_step_time(base, after)
            if math.isfinite(a) and math.isfinite(b) and b > 0:
                times[f"{st}/seed{s}"] = a / b
    iv = _ci(times.values())
    claims.append(_claim_row(ce, iv, stats.verdict(iv["lo"], iv["hi"], ce.threshold, ce.direction), _figure(iv, unit="x"),
                             how, per_pair=times))

    # (f) 4x learning rate
    cf = CLAIMS[5]
    top = max(float(m) for m in cfg.lr_multipliers)
    sweep_keys = [(st, s) for st in cfg.styles[: cfg.lr_sweep_styles] for s in list(seeds)[: cfg.lr_sweep_seeds]]
    diverged = {"sd-moe": 0, "baseline": 0}
    runs_at_top = {"sd-moe": 0, "baseline": 0}
    tolerance = {}
    for st, s in sweep_keys:
        for variant in ("sd-moe", "baseline"):
            r = by.get((st, variant, fmt_mult(top), s))
            if r and r["status"] in ("done", "diverged"):
                runs_at_top[variant] += 1
                diverged[variant] += r["status"] == "diverged"
        sd_lo, sd_hi = final(st, "sd-moe", 1.0, s), final(st, "sd-moe", top, s)
        b_lo, b_hi = final(st, "baseline", 1.0, s), final(st, "baseline", top, s)
        if None not in (sd_lo, sd_hi, b_lo, b_hi) and all(math.isfinite(x) for x in (sd_lo, sd_hi, b_lo, b_hi)):
            tolerance[f"{st}/seed{s}"] = (b_hi - b_lo) - (sd_hi - sd_lo)
    iv = _ci(tolerance.values())
    if top < 4 or "sd-moe" not in cfg.lr_sweep_variants or not sweep_keys:
        v, note = stats.INCONCLUSIVE, "the compare ran no 4x learning rate for SD-MoE"
    elif runs_at_top["sd-moe"] == 0:
        v, note = stats.INCONCLUSIVE, "no finished SD-MoE run at the top learning rate"
    else:
        stable = stats.NOT_REPRODUCED if diverged["sd-moe"] else stats.REPRODUCED
        v = stats.combine([stable, stats.verdict(iv["lo"], iv["hi"], 0.0, +1)])
        note = (f"at {fmt_mult(top)}x: SD-MoE diverged in {diverged['sd-moe']} of {runs_at_top['sd-moe']} runs, "
                f"baseline in {diverged['baseline']} of {runs_at_top['baseline']}; figure: baseline's loss increase "
                f"minus SD-MoE's (nats)")
    claims.append(_claim_row(cf, iv, v, _figure(iv, unit=" nats"), note, per_pair=tolerance, diverged=diverged,
                             top_lr_mult=top))

    # (g) vs the control
    cg = CLAIMS[6]
    if "control" in has:
        diffs = paired("control", "sd-moe")
        iv = _ci(diffs.values())
        v = stats.verdict(iv["lo"], iv["hi"], cg.threshold, cg.direction)
        note = "control - baseline: " + _figure(_ci(paired("control", "baseline").values()))
    else:
        diffs, iv, v, note = {}, _ci([]), stats.INCONCLUSIVE, "the compare ran no control variant"
    claims.append(_claim_row(cg, iv, v, _figure(iv, unit=" nats"), note, per_pair=diffs))

    return {
        "config": cfg.to_dict(),
        "n_runs": len(runs),
        "n_done": sum(r["status"] == "done" for r in runs.values()),
        "n_diverged": sum(r["status"] == "diverged" for r in runs.values()),
        "claims": claims,
        "variants": _variant_table(cfg, by, seeds),
        "domains": _domain_table(cfg, by, seeds),
        "lr_sweep": _lr_table(cfg, by, seeds),
        "ablations": _ablation_table(cfg, by, seeds),
        "parameters": _param_table(cfg, by),
        "runs": list(runs.values()),
    }


def _variant_table(cfg, by, seeds) -> list[dict]:
    rows = []
    for st in cfg.styles:
        for variant in cfg.variants:
            finals = [by[k]["final_mean"] for s in seeds if (k := (st, variant, "1", s)) in by
                      and by[k]["status"] in ("done", "diverged")]
            iv = _ci(finals)
            walls = [by[k]["wall_s"] for s in seeds if (k := (st, variant, "1", s)) in by and by[k]["wall_s"]]
            rows.append({"style": st, "variant": variant, "n": iv["n"], "val_loss": iv["mean"], "lo": iv["lo"],
                         "hi": iv["hi"], "std": iv["std"], "wall_s": _mean(walls)})
    return rows


def _domain_table(cfg, by, seeds) -> list[dict]:
    """Per style, domain and variant: mean loss, perplexity and its CI over seeds; paired diff vs baseline."""
    rows = []
    for st in cfg.styles:
        domains = []
        for s in seeds:
            r = by.get((st, "baseline", "1", s))
            if r and r["final"]:
                domains = [d for d in r["final"] if d != "mean"]
                break
        for d in domains:
            for variant in cfg.variants:
                vals, diffs = [], []
                for s in seeds:
                    r, b = by.get((st, variant, "1", s)), by.get((st, "baseline", "1", s))
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


def _lr_table(cfg, by, seeds) -> list[dict]:
    rows = []
    for st in cfg.styles[: cfg.lr_sweep_styles]:
        sweep_seeds = list(seeds)[: cfg.lr_sweep_seeds]
        for variant in cfg.lr_sweep_variants:
            for m in sorted(float(x) for x in cfg.lr_multipliers):
                rs = [by.get((st, variant, fmt_mult(m), s)) for s in sweep_seeds]
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


def _ablation_table(cfg, by, seeds) -> list[dict]:
    names = [v for v in cfg.variants if v != "baseline"] + [f"rank-{r}" for r in cfg.rank_sweep] + list(cfg.ablations)
    rows = []
    for variant in dict.fromkeys(names):
        vs_base, vs_sd, tails, times, n = [], [], [], [], 0
        for st in cfg.styles:
            for s in seeds:
                r, b, sd = (by.get((st, v, "1", s)) for v in (variant, "baseline", "sd-moe"))
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


def _param_table(cfg, by) -> list[dict]:
    rows, seen = [], set()
    for (st, variant, mult, _s), r in sorted(by.items(), key=lambda kv: str(kv[0])):
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
    lines = [f"compare: {summary['n_done']} of {summary['n_runs']} runs done"
             + (f", {summary['n_diverged']} diverged" if summary["n_diverged"] else "")]
    done = [r for r in summary["runs"] if r["status"] == "done" and r.get("unigram_entropy")]
    for variant in ("baseline", "sd-moe"):
        finals = [r["final_mean"] for r in done if r["variant"] == variant and r["lr_mult"] == 1.0]
        if finals:
            lines.append(f"  {variant}: mean validation loss {statistics.mean(finals):.3f} nats/token over "
                         f"{len(finals)} runs; unigram entropy of the corpus {done[0]['unigram_entropy']:.3f} nats/token")
    for c in summary["claims"]:
        lines.append(f"  ({c['claim']}) {c['verdict'].upper():<15} {c['statement']}: {c['figure']}")
    return "\n".join(lines)
