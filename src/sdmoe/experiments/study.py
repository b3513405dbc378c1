"""`sdmoe study`: when does SD-MoE help? One factor at a time, every cell a paired `sdmoe compare`.

    sdmoe study --factor text          each bundled domain alone, and the mix
    sdmoe study --factor repetition    passes over the data: the same step count on less text
                                       (data.max_train_tokens), and the same text for more steps
    sdmoe study --factor size          d = 64, 96, 128 at a fixed number of tokens per parameter

Each cell is a compare in OUT/<factor>/<cell>/ (resumable; its own report.html) on the demo
preset (qwen2_moe, 3 paired seeds), everything but the factor fixed. The study reads every run's
final validation loss and its passes over its training text (the run's start record), pairs runs
by seed and writes OUT/study.json, OUT/study.md (one table per factor: the gain baseline - variant
with its 95% t-interval) and OUT/study.png (the gain against passes and against size, one line
per text). Re-running the command skips finished cells and runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmoe.errors import UserError
from sdmoe.experiments.claims import TUNED, gain_figure, load_run, paired_gains
from sdmoe.experiments.grid import CompareConfig, fmt_mult, plan
from sdmoe.experiments.stats import t_interval
from sdmoe.files import write_json_atomic, write_text_atomic

FACTORS = ("text", "repetition", "size")
TEXTS = ("drama", "encyclopedia", "fairy_tales", "mix")
BASE_STEPS = 400  # the demo preset's
TOKENS_PER_STEP = 16 * 64  # the demo preset's batch x sequence


@dataclass(frozen=True)
class Cell:
    """One compare of the study: the factor's value in `label`, the text, and what the compare changes."""

    factor: str
    name: str  # its directory under OUT/<factor>/
    text: str  # a bundled domain, or "mix"
    label: str  # the factor's value as the tables print it
    d: int = 64
    steps: int = BASE_STEPS
    max_train_tokens: int = 0
    variants: tuple[str, ...] = ("baseline", "sd-moe")
    rate_check: bool = False  # the baseline at 0.5x and 2x the rate on seed 0: is 1x its tuned rate here?

    def compare_config(self, seeds: int) -> CompareConfig:
        ov = [f"model.hidden_size={self.d}", f"model.expert_ffn={self.d}"]
        if self.text != "mix":
            ov.append(f"data.domains={self.text}")
        if self.max_train_tokens:
            ov.append(f"data.max_train_tokens={self.max_train_tokens}")
        return CompareConfig(
            preset="demo", styles=["qwen2_moe"], seeds=seeds, variants=list(self.variants), steps=self.steps,
            lr_multipliers=[0.5, 1.0, 2.0] if self.rate_check else [1.0], lr_sweep_styles=int(self.rate_check),
            lr_sweep_seeds=1, lr_sweep_variants=["baseline"], overrides=ov, analyze=False,
            rerun_baseline=self.factor == "text", timing_processes=0)  # the study reads losses, not step times


def demo_parameters(d: int) -> int:
    """Non-embedding parameters of the demo preset's model at width d (2 layers, 8 experts of width d, a
    shared expert of width d, attention d x d four times): the size the tokens-per-parameter rule scales."""
    per_layer = 4 * d * d + 8 * 3 * d * d + 3 * d * d + 8 * d + d
    return 2 * per_layer


def cells(factor: str, sizes: tuple[int, ...] = (64, 96, 128)) -> list[Cell]:
    """The cells of one factor, in the order they run."""
    if factor == "text":
        return [Cell("text", t, t, t, variants=("baseline", "sd-moe", "control"), rate_check=True) for t in TEXTS]
    if factor == "repetition":
        out = []
        # the same 400 steps over less text: 1, 2, 4 and 8 passes (the whole text is the text factor's cell)
        for text in ("encyclopedia", "drama"):
            for passes in (1, 2, 4, 8):
                tokens = BASE_STEPS * TOKENS_PER_STEP // passes
                out.append(Cell("repetition", f"{text}-{passes}x", text, f"{passes} passes (truncated)",
                                max_train_tokens=tokens))
        # the converse: the whole text, more steps
        for steps in (800, 1600):
            out.append(Cell("repetition", f"encyclopedia-{steps}-steps", "encyclopedia", f"{steps} steps (whole text)",
                            steps=steps))
        return out
    if factor == "size":
        base = demo_parameters(64)
        return [Cell("size", f"d{d}", "mix", f"d={d}", d=d,
                     steps=round(BASE_STEPS * demo_parameters(d) / base)) for d in sizes]
    raise UserError(f"unknown study factor {factor!r}; choose {', '.join(FACTORS)} or all")


# -- reading the cells ---------------------------------------------------------------------------


def cell_result(cell: Cell, out: Path, seeds: int = 3) -> dict[str, Any]:
    """The paired gains of one finished (or partly finished) cell, from its runs' files."""
    root = out / cell.factor / cell.name / "runs"
    runs = [load_run(root / spec.run_id, spec) for spec in plan(cell.compare_config(seeds))]
    style = runs[0]["style"]
    gains = {v: t_interval(list(paired_gains(runs, style, v).values())) for v in cell.variants if v != "baseline"}
    done = [r for r in runs if r["status"] == "done"]
    base = {r["seed"]: r for r in done if r["variant"] == "baseline" and r["lr_mult"] == TUNED}
    passes = [r["passes"] for r in base.values() if r["passes"] is not None]
    rerun = next((r for r in done if r["variant"] == "baseline-rerun"), None)
    same_seed = None if rerun is None or 0 not in base else abs(rerun["final_mean"] - base[0]["final_mean"])
    rates = {fmt_mult(r["lr_mult"]): r["final_mean"] for r in done if r["variant"] == "baseline" and r["seed"] == 0}
    return {"factor": cell.factor, "cell": cell.name, "text": cell.text, "label": cell.label, "d": cell.d,
            "steps": cell.steps, "passes": sum(passes) / len(passes) if passes else None,
            "baseline_loss": t_interval([r["final_mean"] for r in base.values()]).mean,
            "gains": {v: g.to_dict() for v, g in gains.items()}, "same_seed_noise": same_seed,
            "baseline_best_rate": min(rates, key=rates.get) + "x" if len(rates) > 1 else None}


def run_study(factors: list[str], out_dir: str | Path, seeds: int = 3, sizes: tuple[int, ...] = (64, 96, 128),
              progress: bool = True, device: str = "auto") -> dict:
    """Run (or resume) every cell of `factors`, then write study.json, study.md and study.png."""
    from sdmoe.experiments.compare import run_compare

    out = Path(out_dir)
    plan = [c for f in factors for c in cells(f, sizes)]
    for i, cell in enumerate(plan):
        if progress:
            print(f"study cell {i + 1}/{len(plan)}: {cell.factor} {cell.name}", flush=True)
        run_compare(cell.compare_config(seeds), out / cell.factor / cell.name, progress=progress, device=device)
    return write_study(out, factors, sizes, seeds)


def write_study(out: Path, factors: list[str], sizes: tuple[int, ...] = (64, 96, 128), seeds: int = 3) -> dict:
    """study.json, study.md and study.png from the cells' run files (cells not started are left out)."""
    results = [cell_result(c, out, seeds) for f in factors for c in cells(f, sizes)
               if (out / c.factor / c.name).is_dir()]
    payload = {"version": 1, "factors": factors, "cells": results}
    write_json_atomic(out / "study.json", payload)
    write_text_atomic(out / "study.md", study_markdown(results))
    if results:
        plot_study(results, out / "study.png")
    return payload


def study_markdown(results: list[dict]) -> str:
    lines = ["# When does SD-MoE help?", "",
             "Gain = the plain MoE's final validation loss - the variant's (nats/token), paired by seed, mean "
             "and 95% t-interval. Passes = tokens drawn / training tokens held.", ""]
    for factor in FACTORS:
        rows = [r for r in results if r["factor"] == factor]
        if not rows:
            continue
        variants = sorted({v for r in rows for v in r["gains"]}, key=["sd-moe", "control"].index)
        lines += [f"## {factor}", "",
                  "| cell | text | passes | steps | baseline loss | " + " | ".join(f"{v} gain" for v in variants)
                  + " | baseline's best rate | same-seed noise |",
                  "|---|---|---|---|---|" + "---|" * len(variants) + "---|---|"]
        for r in rows:
            passes = f"{r['passes']:.2f}" if r["passes"] is not None else "-"
            noise = f"{r['same_seed_noise']:.4f}" if r["same_seed_noise"] is not None else "-"
            lines.append(f"| {r['label']} | {r['text']} | {passes} | {r['steps']} | {r['baseline_loss']:.3f} | "
                         + " | ".join(gain_figure(r["gains"].get(v, {}), one="1 seed", what="seeds")
                                      for v in variants)
                         + f" | {r['baseline_best_rate'] or '-'} | {noise} |")
        lines.append("")
    return "\n".join(lines)


def plot_study(results: list[dict], path: Path) -> None:
    """The default's gain with its interval against passes over the data (one line per text) and against d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by_text: dict[str, list[dict]] = {}
    for r in results:
        if r["factor"] in ("text", "repetition") and r["passes"] is not None and r["gains"].get("sd-moe", {}).get("n"):
            by_text.setdefault(r["text"], []).append(r)
    for text, rows in sorted(by_text.items()):
        rows.sort(key=lambda r: r["passes"])
        x = [r["passes"] for r in rows]
        g = [r["gains"]["sd-moe"] for r in rows]
        mean = [v["mean"] for v in g]
        err = [[v["mean"] - v["lo"] if v["n"] > 1 else 0 for v in g], [v["hi"] - v["mean"] if v["n"] > 1 else 0 for v in g]]
        a.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=text)
    a.axhline(0, color="grey", lw=0.8)
    a.set(xscale="log", xlabel="passes over the training text", ylabel="gain of SD-MoE (nats/token)",
          title="gain against repetition (95% intervals)")
    a.set_xticks([0.25, 0.5, 1, 2, 4, 8, 16], labels=["0.25", "0.5", "1", "2", "4", "8", "16"])
    a.minorticks_off()
    if by_text:
        a.legend()
    size = sorted((r for r in results if r["factor"] == "size" and r["gains"].get("sd-moe", {}).get("n")),
                  key=lambda r: r["d"])
    if size:
        g = [r["gains"]["sd-moe"] for r in size]
        b.errorbar([r["d"] for r in size], [v["mean"] for v in g],
                   yerr=[[v["mean"] - v["lo"] if v["n"] > 1 else 0 for v in g],
                         [v["hi"] - v["mean"] if v["n"] > 1 else 0 for v in g]], marker="o", capsize=3, label="mix")
        b.legend()
    else:
        b.text(0.5, 0.5, "no size cell finished yet", ha="center", va="center", transform=b.transAxes)
    b.axhline(0, color="grey", lw=0.8)
    b.set(xlabel="hidden size d", title="gain against size (fixed tokens per parameter)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
