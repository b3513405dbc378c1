"""`sdmoe study`: when does SD-MoE help? One factor at a time, every cell a paired compare on the engine.

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

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmoe.config_fields import assign, check_tree, setting
from sdmoe.errors import UserError
from sdmoe.experiments.engine import Experiment, ExperimentResult, Session, run_experiment
from sdmoe.experiments.grid import CompareConfig, fmt_mult, plan
from sdmoe.experiments.judging import TUNED, gain_figure, paired_gains
from sdmoe.experiments.runs import load_run
from sdmoe.experiments.stats import t_interval
from sdmoe.files import tmp_file_name, write_json_atomic, write_text_atomic

FACTORS = ("text", "repetition", "size")
TEXTS = ("drama", "encyclopedia", "fairy_tales", "mix")
BASE_STEPS = 400  # the demo preset's
TOKENS_PER_STEP = 16 * 64  # the demo preset's batch x sequence
STUDY_FILE = "study_config.json"  # the study's settings; study.json holds its results
OUTPUTS = ("study.json", "study.md", "study.png")


@dataclass
class StudyConfig:
    preset: str = setting("demo", label="train preset")  # every cell's runs start from it
    seeds: int = setting(3, ge=2)
    sizes: list[int] = setting([64, 96, 128], min_len=1, unique=True, ge=8)  # the size factor's hidden sizes
    width: int = setting(64, ge=8)  # d of the text and repetition cells
    steps: int = setting(BASE_STEPS, ge=1)  # a cell's steps at `width` (the size cells scale them)
    overrides: list[str] = setting([])  # key=value on every run
    # the factors run so far: a study grows factor by factor in one --out, so a resume may add one
    factors: list[str] = setting(["text"], min_len=1, unique=True, resume="any")

    def tokens_per_step(self) -> int:
        from sdmoe.train.config import preset

        data = preset(self.preset).data
        return data.batch_size * data.seq_len


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

    def compare_config(self, seeds: int, study: StudyConfig | None = None) -> CompareConfig:
        study = study or StudyConfig()
        ov = [f"model.hidden_size={self.d}", f"model.expert_ffn={self.d}"]
        if self.text != "mix":
            ov.append(f"data.domains={self.text}")
        if self.max_train_tokens:
            ov.append(f"data.max_train_tokens={self.max_train_tokens}")
        return CompareConfig(
            preset=study.preset, styles=["qwen2_moe"], seeds=seeds, variants=list(self.variants), steps=self.steps,
            lr_multipliers=[0.5, 1.0, 2.0] if self.rate_check else [1.0], lr_sweep_styles=int(self.rate_check),
            lr_sweep_seeds=1, lr_sweep_variants=["baseline"], overrides=[*study.overrides, *ov], analyze=False,
            rerun_baseline=self.factor == "text", timing_processes=0)  # the study reads losses, not step times


def demo_parameters(d: int, layers: int = 2, experts: int = 8) -> int:
    """Non-embedding parameters of the demo preset's model at width d (2 layers, 8 experts of width d, a
    shared expert of width d, attention d x d four times): the size the tokens-per-parameter rule scales."""
    per_layer = 4 * d * d + experts * 3 * d * d + 3 * d * d + experts * d + d
    return layers * per_layer


def cells(factor: str, sizes: tuple[int, ...] = (64, 96, 128), study: StudyConfig | None = None) -> list[Cell]:
    """The cells of one factor, in the order they run."""
    study = study or StudyConfig(sizes=list(sizes))
    steps, width = study.steps, study.width
    if factor == "text":
        return [Cell("text", t, t, t, d=width, steps=steps, variants=("baseline", "sd-moe", "control"),
                     rate_check=True) for t in TEXTS]
    if factor == "repetition":
        out = []
        # the same steps over less text: 1, 2, 4 and 8 passes (the whole text is the text factor's cell)
        for text in ("encyclopedia", "drama"):
            for passes in (1, 2, 4, 8):
                tokens = steps * study.tokens_per_step() // passes
                out.append(Cell("repetition", f"{text}-{passes}x", text, f"{passes} passes (truncated)", d=width,
                                steps=steps, max_train_tokens=tokens))
        # the converse: the whole text, more steps
        for more in (2 * steps, 4 * steps):
            out.append(Cell("repetition", f"encyclopedia-{more}-steps", "encyclopedia", f"{more} steps (whole text)",
                            d=width, steps=more))
        return out
    if factor == "size":
        base = demo_parameters(width)
        return [Cell("size", f"d{d}", "mix", f"d={d}", d=d, steps=round(steps * demo_parameters(d) / base))
                for d in study.sizes]
    raise UserError(f"unknown study factor {factor!r}; choose {', '.join(FACTORS)} or all")


# -- the experiment: every cell a compare -------------------------------------------------------------


class Study(Experiment):
    command, what, settings_file = "study", "study", STUDY_FILE
    settings = StudyConfig

    def plan(self) -> list[Cell]:
        return [c for f in self.config.factors for c in cells(f, study=self.config)]

    def check(self, out: Path) -> None:
        """The settings, then every run of every cell (each cell's `plan` validates its runs)."""
        check_tree(self.config, "study")
        for f in self.config.factors:
            if f not in FACTORS:
                raise UserError(f"unknown study factor {f!r}; choose {', '.join(FACTORS)} or all")
        for cell in self.plan():
            plan(cell.compare_config(self.config.seeds, self.config))

    def adopts(self, out: Path) -> bool:
        """A study written before its settings file: only factor folders and the study's own files."""
        return all(p.name in (*FACTORS, *OUTPUTS) for p in out.iterdir())

    def probes(self, out: Path) -> list[str]:
        return [tmp_file_name(n) for n in OUTPUTS]

    def execute(self, session: Session) -> None:
        from sdmoe.experiments.compare import Compare

        todo = self.plan()
        for i, cell in enumerate(todo):
            session.say(f"study cell {i + 1}/{len(todo)}: {cell.factor} {cell.name}")
            result = run_experiment(Compare(cell.compare_config(self.config.seeds, self.config)),
                                    session.out / cell.factor / cell.name, session.progress, session.device,
                                    session.max_runs)
            session.records += result.runs

    def report(self, out: Path) -> ExperimentResult:
        payload = write_study(out, study=self.config)
        text = (out / "study.md").read_text(encoding="utf-8") + \
            f"\nstudy: {len(payload['cells'])} cells; {out / 'study.md'}, study.json, study.png"
        return ExperimentResult(out, self.config, text, payload, out / "study.md")


# -- reading the cells ---------------------------------------------------------------------------


def cell_result(cell: Cell, out: Path, seeds: int = 3, study: StudyConfig | None = None) -> dict[str, Any]:
    """The paired gains of one finished (or partly finished) cell, from its runs' files."""
    root = out / cell.factor / cell.name / "runs"
    runs = [load_run(root / spec.run_id, spec) for spec in plan(cell.compare_config(seeds, study))]
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
              progress: bool = True, device: str = "auto", study: StudyConfig | None = None) -> dict:
    """Run (or resume) every cell of `factors`, then write study.json, study.md and study.png."""
    cfg = dataclasses.replace(study or StudyConfig(), seeds=seeds, sizes=list(sizes), factors=list(factors))
    return run_experiment(Study(cfg), out_dir, progress, device).summary


def write_study(out: Path, factors: list[str] | None = None, sizes: tuple[int, ...] = (64, 96, 128), seeds: int = 3,
                study: StudyConfig | None = None) -> dict:
    """study.json, study.md and study.png from the cells' run files: every cell of every factor started in
    `out` (`factors`: only these), cells not started left out."""
    study = study or StudyConfig(seeds=seeds, sizes=list(sizes))
    results = [cell_result(c, out, study.seeds, study) for f in (factors or FACTORS) for c in cells(f, study=study)
               if (out / c.factor / c.name).is_dir()]
    payload = {"version": 1, "factors": sorted({r["factor"] for r in results}, key=FACTORS.index), "cells": results}
    write_json_atomic(out / "study.json", payload)
    write_text_atomic(out / "study.md", study_markdown(results))
    if results:
        plot_study(results, out / "study.png")
    return payload


# -- flags: what `sdmoe study` sets -----------------------------------------------------------------

FLAGS = ("factor", "seeds", "sizes", "overrides")


def apply_flags(cfg: StudyConfig, flags: dict[str, Any]) -> StudyConfig:
    """--factor text|repetition|size|all (comma-separated), --seeds, --sizes 64,96,128: each checked in one line."""
    if flags.get("factor") is not None:
        raw = flags["factor"]
        factors = list(FACTORS) if raw == "all" else [f.strip() for f in raw.split(",") if f.strip()]
        if not factors or any(f not in FACTORS for f in factors):
            raise UserError(f"--factor {raw!r}: choose from {', '.join(FACTORS)} or all")
        cfg.factors = factors
    if flags.get("seeds") is not None:
        if flags["seeds"] < 2:
            raise UserError(f"--seeds {flags['seeds']}: a paired interval needs at least 2 seeds")
        assign(cfg, "seeds", flags["seeds"])
    if flags.get("sizes") is not None:
        raw = flags["sizes"]
        try:
            sizes = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--sizes takes comma-separated hidden sizes such as 64,96,128, got {raw!r}") from None
        if not sizes or any(d < 8 or d % 8 for d in sizes):
            raise UserError(f"--sizes {raw!r}: each hidden size must be a multiple of 8 (4 heads of even size)")
        cfg.sizes = sizes
    cfg.overrides = list(cfg.overrides) + list(flags.get("overrides") or [])
    return cfg


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
