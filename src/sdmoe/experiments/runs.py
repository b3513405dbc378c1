"""A run of an experiment as its files say it is: read, never trained. No torch, no model.

Every experiment keeps its runs as `sdmoe train` writes them (run.json, metrics.jsonl, model/) and
beside them two files of its own:

    RUN_RECORD_FILE  (compare_run.json)  what the engine records: the run's plan fields, status
                     (done | diverged), wall time, resumes, trainable parameters after the split
    ANALYSIS_FILE    (analysis.json)     the post-hoc analysis of the final model (routing, domain MI)

`load_run(run_dir)` turns them into one JSON-able record (final loss, eval curve, step times, the
spectral monitor, specialisation) that every experiment's judging reads; `steps_ratio` and
`median_step_time` are the per-pair measurements made on two such records.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from sdmoe.experiments import stats
from sdmoe.files import read_json_or_none, read_jsonl_lenient
from sdmoe.train.run_record import read_run_record

RUN_RECORD_FILE = "compare_run.json"  # beside train's own run.json (`sdmoe.train.run_record`); its old name kept
COMPARE_RUN_FILE = RUN_RECORD_FILE
ANALYSIS_FILE = "analysis.json"
PLAN_FIELDS = ("style", "variant", "seed", "lr_mult")  # a compare run's place in its grid


def mean(xs) -> float:
    """The mean of the finite values; nan without one."""
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
    return mean(vals) if vals else None


def _specialisation(analysis: dict | None) -> dict | None:
    if not analysis:
        return None
    fun = analysis.get("functional") or []
    if not fun:
        return None
    return {
        "domain_mi_normalized": mean(f.get("domain_mi_normalized") for f in fun),
        "domain_mi_nats": mean(f.get("domain_mi_nats") for f in fun),
        "shared_experts": sum(len(f.get("shared_experts") or []) for f in fun),
        "load_entropy": mean(f.get("load_entropy") for f in fun),
        "output_cosine_mean": mean(f.get("output_cosine_mean") for f in fun),
    }


def _status(run: dict, mine: dict) -> str:
    if mine.get("status") == "diverged":
        return "diverged"
    if not run:
        return "missing"
    return "done" if run.get("status") == "done" else "running"


def _series(metrics: list[dict]) -> dict[str, Any]:
    """The eval curve, the logged step times and losses, and the spectral monitor of a metrics.jsonl."""
    evals = sorted((r for r in metrics if r.get("event") == "eval"), key=lambda r: r["step"])
    logs = sorted((r for r in metrics if "step_time" in r and "event" not in r), key=lambda r: r["step"])
    monitors = sorted((r for r in metrics if r.get("event") == "monitor"), key=lambda r: r["step"])
    return {
        "curve": {"step": [r["step"] for r in evals], "mean": [r["val"]["mean"] for r in evals],
                  "domains": {d: [r["val"].get(d) for r in evals] for d in (evals[0]["val"] if evals else {})
                              if d != "mean"}},
        "log": {"step": [r["step"] for r in logs], "step_time": [r["step_time"] for r in logs],
                "loss": [r.get("loss") for r in logs]},
        "monitor": {"step": [r["step"] for r in monitors],
                    "param_overlap": [r.get("param_overlap/mean") for r in monitors],
                    "tails_overlap": [_tails_overlap(r) for r in monitors],
                    "baseline": next((r.get("overlap_baseline") for r in monitors if r.get("overlap_baseline")), None)},
    }


def load_run(run_dir: Path, spec=None) -> dict[str, Any]:
    """One run's figures from its files (missing files give empty fields, never an error). `spec`: the
    run's place in a compare's grid (`grid.RunSpec`); without it, the engine's run record says it."""
    run = read_run_record(run_dir)
    mine = read_json_or_none(run_dir / RUN_RECORD_FILE) or {}
    metrics = read_jsonl_lenient(run_dir / "metrics.jsonl")
    cfg = run.get("config", {})
    status = _status(run, mine)
    final = run.get("val_loss") if status == "done" else None
    if status == "diverged":
        final = {"mean": math.inf}
    start = next((r for r in metrics if r.get("event") == "start"), {})
    split = next((r for r in metrics if r.get("event") == "split"), None)
    rec: dict[str, Any] = {
        "run_id": spec.run_id if spec else mine.get("run_id", str(run_dir)),
        **{k: getattr(spec, k) if spec else mine.get(k) for k in PLAN_FIELDS},
        "status": status,
        "method": cfg.get("method"),
        "steps": cfg.get("loop", {}).get("steps"),
        "log_every": cfg.get("loop", {}).get("log_every"),
        "split_step": cfg.get("sdmoe", {}).get("split_step") if cfg.get("method") == "sd-moe" else None,
        "lr": cfg.get("optim", {}).get("lr"),
        "final": final,
        "final_mean": (final or {}).get("mean", math.nan) if final else math.nan,
        **_series(metrics),
        "trainable_parameters": start.get("trainable_parameters"),
        "train_tokens": start.get("train_tokens"),
        "passes": start.get("passes"),  # tokens the run draws / training tokens the text holds
        "unigram_entropy": start.get("unigram_entropy"),
        "trainable_parameters_after_split": (split or {}).get("trainable_parameters")
        or mine.get("trainable_parameters_after_split"),
        "wall_s": mine.get("wall_s"),
        "specialisation": _specialisation(read_json_or_none(run_dir / ANALYSIS_FILE)),
    }
    if split is not None:
        rec["split_logits_rel_change"] = split.get("logits_rel_change")
    return rec


def median_step_time(run: dict, after: int | None) -> float:
    """Median per-step time over log windows that start at or after step `after`."""
    every = run.get("log_every") or 1
    vals = [t for s, t in zip(run["log"]["step"], run["log"]["step_time"])
            if after is None or s - every >= after]
    return statistics.median(vals) if vals else math.nan


def steps_ratio(sd: dict, base: dict) -> tuple[float | None, float | None]:
    """(steps ratio, wall-clock ratio) for run `sd` to reach run `base`'s final loss; None when never."""
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


def load_imbalance(run_dir: Path) -> float | None:
    """The run's last logged window of expert load: the busiest expert's share times E, mean over layers
    (1 = balanced, E = one expert takes every token); None before a window was logged."""
    logs = [r for r in read_jsonl_lenient(Path(run_dir) / "metrics.jsonl") if "load" in r and "event" not in r]
    if not logs:
        return None
    load = logs[-1]["load"]
    return sum(max(row) * len(row) for row in load) / len(load)
