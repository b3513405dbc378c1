"""The analysis report: `analysis.json`'s dict in, PNG files and `report.html` out.

Imports no model code: works from the plain dict `AnalysisResult.to_dict()`
writes (so a saved `analysis.json` can be re-rendered).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from sdmoe.report import plots
from sdmoe.report.html import HtmlReport, Raw, badge_html

SECTION_TITLES = {
    "overview": "Overview",
    "parameters": "Finding 1: experts share a parameter subspace",
    "gradients": "Finding 2: gradients are aligned and low-rank; so is the data",
    "gating": "Finding 3: the router reads the dominant directions",
    "functional": "Functional signs: load, co-activation, output similarity, domains",
}


def _nan(v):
    return v is None or (isinstance(v, float) and math.isnan(v))


def _overall_badge(sec, what: str, rows) -> None:
    """One badge for a finding: its mean overlap ratio to random over every layer and projection."""
    label, verdict = _ratio_verdict(_mean(r["ratio"] for r in rows))
    sec.badge(f"{what}: {label}", verdict)


def _ratio_verdict(ratio) -> tuple[str, str]:
    if _nan(ratio):
        return "n/a", "info"
    # "warn": the experts share directions (the paper's finding holds here);
    # "pass": near random, i.e. already specialised in this respect.
    if ratio >= 3:
        return f"{ratio:.1f}x random: strong overlap", "warn"
    if ratio >= 1.5:
        return f"{ratio:.1f}x random: some overlap", "info"
    return f"{ratio:.1f}x random: near random", "pass"


def _by_layer(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        out[r["layer"]].append(r)
    return dict(sorted(out.items()))


def _mean(xs):
    xs = [x for x in xs if not _nan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def render_plots(d: dict) -> dict[str, bytes]:
    """Every figure of the report as {file name: PNG bytes}."""
    pngs: dict[str, bytes] = {}
    params = _by_layer(d.get("parameters", []))
    grads = _by_layer(d.get("gradients", []))
    if params:
        groups = {f"L{layer}": {r["projection"]: r["mean_overlap"] for r in recs} for layer, recs in params.items()}
        base = next(iter(params.values()))[0]["baseline"]
        pngs["param_overlap_by_layer.png"] = plots.grouped_bars(
            groups, base, "Parameter overlap (mean off-diagonal)", "overlap"
        )
    for layer, recs in params.items():
        pngs[f"param_overlap_L{layer}.png"] = plots.overlap_heatmaps(
            {r["projection"]: r["overlap"] for r in recs}, f"layer {layer}: top-{recs[0]['k']} subspace overlap"
        )
        pngs[f"spectra_L{layer}.png"] = plots.spectra_plot(
            {r["projection"]: r["singular_values"] for r in recs}, f"layer {layer}: top singular values per expert"
        )
    if grads:
        groups = {f"L{layer}": {r["projection"]: r["mean_overlap"] for r in recs} for layer, recs in grads.items()}
        base = next(iter(grads.values()))[0]["baseline"]
        pngs["grad_overlap_by_layer.png"] = plots.grouped_bars(groups, base, "Gradient overlap (mean off-diagonal)", "overlap")
    for layer, recs in grads.items():
        pngs[f"grad_overlap_L{layer}.png"] = plots.overlap_heatmaps(
            {r["projection"]: r["overlap"] for r in recs}, f"layer {layer}: gradient top-{recs[0]['k']} subspace overlap"
        )
    data = d.get("data", [])
    if data:
        pngs["data_spectrum.png"] = plots.data_spectrum_plot(
            {f"L{r['layer']}": r["eigvals"] for r in data}, data[0]["k"], "Layer-input E[xx^T] spectrum"
        )
    gating = d.get("gating", [])
    if gating:
        vals = {f"L{g['layer']} data": g["data_alignment_mean"] for g in gating}
        for g in gating:
            for p, v in g["common_alignment_mean"].items():
                vals[f"L{g['layer']} U_{p}"] = v
        pngs["router_alignment.png"] = plots.bars_vs_baseline(
            vals, gating[0]["data_baseline"], "Router rows: energy share in subspace", "||P w||^2 / ||w||^2"
        )
    for f in d.get("functional", []):
        pngs[f"load_L{f['layer']}.png"] = plots.load_bars(f["load"], f"layer {f['layer']}: expert load")
        pngs[f"coactivation_L{f['layer']}.png"] = plots.coactivation_heatmap(f["coactivation"], f"layer {f['layer']}: co-activation")
    return pngs


def build_report(d: dict, pngs: dict[str, bytes] | None = None) -> HtmlReport:
    """The HTML report of one analysis dict (figures embedded inline): the overview, then one section per finding."""
    pngs = render_plots(d) if pngs is None else pngs
    meta = d.get("meta", {})
    doc = HtmlReport("SD-MoE analysis", subtitle=f"{meta.get('model', '')}")
    ov = doc.section(SECTION_TITLES["overview"])
    ov.keyvalues({k: v for k, v in meta.items() if not isinstance(v, (dict, list))})
    summary = d.get("summary")
    if summary:
        ov.code(summary)
    for section in (_parameters_section, _gradients_section, _gating_section, _functional_section):
        section(doc, d, pngs)
    return doc


def _parameters_section(doc: HtmlReport, d: dict, pngs: dict[str, bytes]) -> None:
    params = d.get("parameters", [])
    sec = doc.section(
        SECTION_TITLES["parameters"],
        "Overlap s(P,Q) = ||P^T Q||_F^2 / k of each expert's top-k right singular subspace (in the hidden space); "
        "two random k-dim subspaces give k/d. Common energy: share of each expert's ||W||_F^2 inside the top-r "
        "subspace of all experts stacked (random: r/d).",
    )
    if params:
        _overall_badge(sec, "parameters", params)
        sec.table(
            [
                {
                    **_overlap_cells(r),
                    "verdict": Raw(badge_html(*_ratio_verdict(r["ratio"]))),
                    "top-k energy": _mean(r["topk_energy"]),
                    "common energy": _mean(r["common_energy"]),
                    "random r/d": r["common_baseline"],
                }
                for r in params
            ],
            floatfmt="{:.3f}",
        )
        _images(sec, pngs, ("param_overlap", "spectra_"))


def _gradients_section(doc: HtmlReport, d: dict, pngs: dict[str, bytes]) -> None:
    grads, data = d.get("gradients", []), d.get("data", [])
    sec = doc.section(
        SECTION_TITLES["gradients"],
        "Overlap of each expert's top-k gradient subspace (causal-LM loss, summed over the batches; experts that "
        "received no token are left out), the share of ||G||_F^2 in its top-r singular values, and the spectrum of "
        "the layer input's second moment E[x x^T].",
    )
    if grads:
        _overall_badge(sec, "gradients", grads)
        sec.table(
            [
                {
                    **_overlap_cells(r),
                    "experts with grad": len(r["active_experts"]),
                    "top-r energy": _mean([v for i, v in enumerate(r["lowrank_share"]) if i in set(r["active_experts"])]),
                    "flat-spectrum r/min(f,d)": r["lowrank_baseline"],
                }
                for r in grads
            ],
            floatfmt="{:.3f}",
        )
    if data:
        sec.table(
            [
                {
                    "layer": r["layer"],
                    "tokens": r["n_tokens"],
                    "top-k trace share": r["topk_share"],
                    "isotropic k/d": r["baseline"],
                    "effective rank": r["effective_rank"],
                    "d": r["d"],
                }
                for r in data
            ],
            floatfmt="{:.3f}",
        )
    _images(sec, pngs, ("grad_overlap", "data_spectrum"))


def _gating_section(doc: HtmlReport, d: dict, pngs: dict[str, bytes]) -> None:
    gating = d.get("gating", [])
    sec = doc.section(
        SECTION_TITLES["gating"],
        "Energy share ||P w_e||^2 / ||w_e||^2 of each router row in the top-k data subspace and in each projection's "
        "common expert subspace (random direction: k/d). Agreement: share of tokens whose top-k experts from x "
        "projected on the top-k data directions equal those from the full x, beside a random k-dim projection.",
    )
    if gating:
        rows = []
        for g in gating:
            row = {
                "layer": g["layer"],
                "data share": g["data_alignment_mean"],
                "random k/d": g["data_baseline"],
            }
            for p, v in g["common_alignment_mean"].items():
                row[f"U_{p} share"] = v
            row.update(
                {
                    "agree exact": g["agreement_exact"],
                    "agree Jaccard": g["agreement_jaccard"],
                    "random-proj exact": g["random_agreement_exact"],
                    "random-proj Jaccard": g["random_agreement_jaccard"],
                    "tokens": g["n_tokens"],
                }
            )
            rows.append(row)
        sec.table(rows, floatfmt="{:.3f}")
        if "router_alignment.png" in pngs:
            sec.image(pngs["router_alignment.png"], "router alignment")


def _functional_section(doc: HtmlReport, d: dict, pngs: dict[str, bytes]) -> None:
    func = d.get("functional", [])
    sec = doc.section(
        SECTION_TITLES["functional"],
        "Load: share of routing slots per expert; entropy normalised by log E; de facto shared: load > 2/E. "
        "Output cosine: mean cosine of experts' outputs on the same inputs. Domain MI: I(expert; domain) over "
        "routing slots, normalised by min(H(expert), H(domain)).",
    )
    if func:
        sec.table(
            [
                {
                    "layer": f["layer"],
                    "tokens": f["n_tokens"],
                    "load entropy": f["load_entropy"],
                    "max load": max(f["load"]),
                    "shared experts": ", ".join(map(str, f["shared_experts"])) or "none",
                    "output cosine": f["output_cosine_mean"],
                    "domain MI (nats)": f.get("domain_mi_nats"),
                    "domain MI (norm.)": f.get("domain_mi_normalized"),
                }
                for f in func
            ],
            floatfmt="{:.3f}",
        )
        _images(sec, pngs, ("load_", "coactivation_"))


def _overlap_cells(r: dict) -> dict:
    """The columns every subspace-overlap finding (parameters, gradients) starts its row with."""
    return {"layer": r["layer"], "projection": r["projection"], "mean overlap": r["mean_overlap"],
            "random k/d": r["baseline"], "ratio": r["ratio"]}


def _images(sec, pngs: dict, prefixes: tuple[str, ...]) -> None:
    """The section's figures: every PNG whose name starts with one of `prefixes`, in figure order."""
    for name in sorted(pngs, key=_figure_order):
        if name.startswith(prefixes):
            sec.image(pngs[name], name.removesuffix(".png"))


def _figure_order(name: str):
    import re

    m = re.search(r"_L(\d+)\.png$", name)
    return (0 if m is None else 1, int(m.group(1)) if m else 0, name)


def write_report(d: dict, out: str | Path) -> dict[str, Path]:
    """Write every PNG and `report.html` into `out` (atomically, file by file) -> {name: path}."""
    out = Path(out)
    pngs = render_plots(d)
    paths = {name: plots.save_png(out / name, png) for name, png in pngs.items()}
    paths["report.html"] = build_report(d, pngs).write(out / "report.html")
    return paths
