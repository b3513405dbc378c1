"""The compare report: one self-contained HTML page from the compare's summary dict.

Imports no model code: `write_report(out, summary)` renders what
`sdmoe.experiments.claims.summarize` computed from the run files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdmoe.report.html import HtmlReport, Raw, badge_html
from sdmoe.report.plots import _png, plt

VARIANT_COLORS = {"baseline": "#4c72b0", "sd-moe": "#c44e52", "control": "#8172b2"}


def _color(variant: str, i: int) -> str:
    return VARIANT_COLORS.get(variant, f"C{(i + 3) % 10}")


def _group_curves(runs: list[dict], style: str, lr_mult: float, field: str, key: str) -> dict[str, tuple]:
    """variant -> (steps, matrix seeds x steps) on the steps every seed has."""
    out: dict[str, tuple] = {}
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["style"] == style and float(r["lr_mult"]) == float(lr_mult) and r[field]["step"]:
            groups.setdefault(r["variant"], []).append(r)
    for variant, rs in groups.items():
        steps = sorted(set.intersection(*(set(r[field]["step"]) for r in rs)))
        if not steps:
            continue
        rows = []
        for r in rs:
            m = dict(zip(r[field]["step"], r[field][key]))
            rows.append([m[s] if m[s] is not None else np.nan for s in steps])
        out[variant] = (np.asarray(steps, float), np.asarray(rows, float))
    return out


def curves_plot(curves: dict[str, tuple], title: str, ylabel: str, hline: float | None = None,
                hlabel: str = "", styles: dict[str, str] | None = None) -> bytes:
    """Mean line per group with a min-max band over seeds."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for i, (name, (x, y)) in enumerate(curves.items()):
        c = _color(name.split(" ")[0], i)
        with warnings.catch_warnings():  # columns a shorter (unfinished) run lacks are all-NaN: left blank
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(y, axis=0), np.nanmin(y, axis=0), np.nanmax(y, axis=0)
        ax.plot(x, mean, color=c, lw=1.5, ls=(styles or {}).get(name, "-"), label=f"{name} (n={y.shape[0]})")
        if y.shape[0] > 1:
            ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1, label=hlabel)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _loss_ylim_curves(curves: dict[str, tuple]) -> dict[str, tuple]:
    # Drop the first evaluation (random init, far above the rest) so the differences show.
    return {k: (x[1:], y[:, 1:]) if len(x) > 2 else (x, y) for k, (x, y) in curves.items()}


def per_pair_matrix(claims: list[dict]) -> list[dict]:
    """Pairs as rows, claims as columns (each claim's per-pair values, then any further columns it
    carries), and a last row with each claim's verdict."""
    columns: dict[str, dict] = {}
    verdicts: dict[str, Raw] = {}
    for c in claims:
        name = f"({c['claim']}) {c.get('short') or c['statement']}"
        columns[name] = c.get("per_pair") or {}
        verdicts[name] = Raw(badge_html(c["verdict"], c["badge"]))
        for extra, values in (c.get("more_columns") or {}).items():
            columns[f"({c['claim']}) {extra}"] = values
    pairs = list(dict.fromkeys(k for values in columns.values() for k in values))
    if not pairs:
        return []
    rows = [{"pair": p, **{name: values.get(p) for name, values in columns.items()}} for p in pairs]
    return rows + [{"pair": "verdict", **verdicts}]


def write_report(out: str | Path, summary: dict) -> Path:
    """report.html of a compare: the headline, the gain per text, the claims, then the tables and figures."""
    out = Path(out)
    cfg = summary["config"]
    doc = HtmlReport(
        "SD-MoE compare: the paper's claims, measured",
        headline=summary.get("headline", ""),
        subtitle=f"train preset {cfg['preset']}; styles {', '.join(cfg['styles'])}; {cfg['seeds']} seeds; "
                 f"{summary['n_done']} of {summary['n_runs']} runs done"
                 + (f", {summary['n_diverged']} diverged" if summary["n_diverged"] else ""),
    )
    for section in (_per_text_section, _claims_section, _loss_section, _spectral_section, _lr_section,
                    _ablation_section, _compute_section, _runs_section):
        section(doc, summary)
    target = out / "report.html"
    doc.write(target)
    return target


def _per_text_section(doc: HtmlReport, summary: dict) -> None:
    if not summary.get("per_text"):
        return
    sec = doc.section("Gain per text", intro=summary["per_text_sentence"] + " Gain = the plain MoE's final "
                      "validation loss - SD-MoE's (nats/token), paired by seed, mean [95% interval]; each "
                      "domain's compare is in texts/<domain>/report.html.")
    sec.table([{"text": r["text"], "training tokens": r["train_tokens"], "passes": r["passes"],
                "pairs": r["n"], "gain (nats)": r["figure"],
                "verdict": Raw(badge_html(r["verdict"], r["badge"]))}
               for r in summary["per_text"]], floatfmt="{:.2f}")


def _claims_section(doc: HtmlReport, summary: dict) -> None:
    sec = doc.section("Claims", intro="Each verdict is computed from the runs: reproduced when the 95% t-interval "
                                      "lies wholly on the claimed side (and, for a claim that states a number, "
                                      "within the stated tolerance of it), not as stated when it lies on the "
                                      "claimed side but away from the stated number, not reproduced when it lies "
                                      "wholly on the other side, inconclusive otherwise (and for step time while the "
                                      "machine's noise is wider than the distance to the threshold); not measurable "
                                      "when this compare cannot test the claim, with the reason. Pairs share style, "
                                      "seed and learning rate: same initial weights and data order.")
    sec.table([{"claim": c["claim"], "paper's claim": c["statement"], "measured (mean [95% CI])": c["figure"],
                "verdict": Raw(badge_html(c["verdict"], c["badge"])), "why": c.get("reason") or "", "n": c["n"],
                "notes": c["note"]}
               for c in summary["claims"]])
    sub = sec.subsection("How each claim is measured")
    sub.table([{"claim": c["claim"], "measure": c["measure"]} for c in summary["claims"]])
    matrix = per_pair_matrix(summary["claims"])
    if matrix:
        sec.subsection("Per pair").paragraph(
            "One row per pair (style/seed; step time: per timing process), one column per claim: the paired "
            "value each verdict is computed from.").table(matrix, floatfmt="{:.4f}")


def _loss_section(doc: HtmlReport, summary: dict) -> None:
    cfg, runs = summary["config"], summary["runs"]
    sec = doc.section("Validation loss", intro="Final mean validation loss over domains (nats/token) at the tuned "
                                               "rate, mean and 95% interval over seeds; std = seed-to-seed spread.")
    sec.table(summary["variants"], floatfmt="{:.4f}")
    for st in cfg["styles"]:
        curves = _group_curves(runs, st, 1.0, "curve", "mean")
        if curves:
            sec.image(curves_plot(_loss_ylim_curves(curves), f"{st}: validation loss (band: min-max over seeds)",
                                  "mean validation loss (nats)"), caption=f"{st}, 1x learning rate")

    sec = doc.section("Per-domain perplexity", intro="Perplexity exp(loss) per domain, 95% interval over seeds; "
                                                     "gain = paired baseline - variant loss (nats) with its interval.")
    sec.table(summary["domains"], floatfmt="{:.3f}")


def _spectral_section(doc: HtmlReport, summary: dict) -> None:
    cfg, runs = summary["config"], summary["runs"]
    sec = doc.section("Spectral similarity over training",
                      intro="Mean off-diagonal overlap of the experts' top-k subspaces (solid) and of SD-MoE's tails "
                            "(dashed), from the trainer's monitor records; dotted: random subspaces (k/d).")
    for st in cfg["styles"]:
        curves, styles = {}, {}
        for field, key, suffix, ls in (("monitor", "param_overlap", "experts", "-"),
                                       ("monitor", "tails_overlap", "tails", "--")):
            for variant, xy in _group_curves(runs, st, 1.0, field, key).items():
                if np.isfinite(xy[1]).any():
                    name = f"{variant} {suffix}"
                    curves[name], styles[name] = xy, ls
        kd = next((r["monitor"]["baseline"] for r in runs if r["style"] == st and r["monitor"]["baseline"]), None)
        if curves:
            sec.image(curves_plot(curves, f"{st}: inter-expert subspace overlap", "overlap", kd, "k/d", styles),
                      caption=f"{st}, 1x learning rate")
        else:
            sec.paragraph(f"{st}: no monitor records (loop.monitor_every = 0?)")


def _lr_section(doc: HtmlReport, summary: dict) -> None:
    sec = doc.section("Learning-rate sweep", intro="Rates relative to the preset's tuned rate; the baseline's best "
                                                   "multiplier should be 1 for the comparison to be fair.")
    if summary["lr_sweep"]:
        best = {r["style"]: r.get("baseline_best_mult") for r in summary["lr_sweep"]}
        for st, m in best.items():
            if m is not None:
                sec.badge(f"{st}: baseline best at {m:g}x", "pass" if m == 1.0 else "warn")
        sec.table(summary["lr_sweep"], floatfmt="{:.4g}")
    else:
        sec.paragraph("no learning-rate sweep in this compare")


def _ablation_section(doc: HtmlReport, summary: dict) -> None:
    sec = doc.section("Ablations", intro="Each variant at the tuned rate; gain = paired baseline - variant final "
                                         "loss (nats) with its 95% interval; step time relative to the paired "
                                         "baseline after the split.")
    rows = []
    for r in summary["ablations"]:
        badge = {"reproduced": "pass", "not reproduced": "fail"}.get(r["verdict"], "warn")
        label = {"reproduced": "better", "not reproduced": "worse"}.get(r["verdict"], "no clear difference")
        rows.append({**{k: v for k, v in r.items() if k != "verdict"}, "vs baseline": Raw(badge_html(label, badge))})
    sec.table(rows, floatfmt="{:.4f}")


def _compute_section(doc: HtmlReport, summary: dict) -> None:
    sec = doc.section("Compute and parameters")
    claim_e = next((c for c in summary["claims"] if c["claim"] == "e"), None)
    if claim_e:
        sec.paragraph(f"SD-MoE / baseline step time, interleaved steps: {claim_e['figure']}. "
                      + (claim_e.get("reason") or claim_e["note"]))
        sec.table([{"style": style, "side": side, "clock": claim_e.get("clock"), "median ms": 1e3 * v["median"],
                    "central 95% of rounds, ms": f"{1e3 * v['lo']:.2f} - {1e3 * v['hi']:.2f}", "rounds": v["n"],
                    "spread / median": f"+-{100 * v['half_width']:.1f}%"}
                   for style, sides in (claim_e.get("sides") or {}).items() for side, v in sides.items()],
                  floatfmt="{:.2f}")
    sec.table(summary["parameters"])
    sec.paragraph("while_training: trainable parameters after the split (SD-MoE's shared parts are extra).")


def _runs_section(doc: HtmlReport, summary: dict) -> None:
    runs = summary["runs"]
    sec = doc.section("Runs", intro="passes: how many times the run read its training text (tokens drawn / "
                                    "training tokens held).")
    sec.table([{"run": r["run_id"], "status": r["status"], "final loss": r["final_mean"],
                "wall s": r["wall_s"], "steps": r["steps"], "passes": r.get("passes")} for r in runs],
              floatfmt="{:.4g}")
