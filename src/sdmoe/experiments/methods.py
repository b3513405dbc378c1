"""`sdmoe methods-compare` (`compare --preset methods`): which specialisation remedy should a user pick?
SD-MoE head to head with the other remedies, and combined with them, paired by seed.

    arms   plain (the reference: the plain MoE, its Switch balance loss per micro-batch), sd-moe (the default
           split), ortho-var (Guo et al.'s orthogonality and variance losses), global-batch (the balance loss
           on the global batch's frequencies, Qwen), sd-moe+ortho-var, sd-moe+global-batch
    rates  each arm at its own best rate (the spec's fair-test rules): one seed on the mix at 0.5x, 1x and 2x
           the base rate, and, for the arms with Guo et al.'s terms, their targets at 0.1x and 10x the
           authors' (1e-4, 1e-2) at 1x; then, while the best point has an untried neighbour (half or twice
           the rate, a tenth or ten times the targets), that neighbour too (`search`), so no arm's point is a
           grid's edge; the lowest final loss picks each arm's (rate, targets)
    cells  mix     a new qwen3_moe (d = 96, 8 experts top-2) trained on the bundled mix
           domain  the same on one domain alone (drama)
           copy    continued from a copy-upcycled dense parent (every expert the parent's FFN)
           btx     continued from Branch-Train-Mix experts: the parent fine-tuned on each domain alone, one
                   expert per domain, non-expert weights their mean

Every run takes 4 micro-batches a step (`loop.micro_batches`), so balancing each micro-batch and balancing
the global batch differ. Per arm and cell (`methods.md`, `methods.json`): the final validation loss and its
gain over plain with the 95% interval and verdict, the steps to plain's final loss, the experts' overlap
(parameters: the monitor's top-4 subspace overlap; outputs: the cosine of their outputs on the same tokens),
I(expert; domain), load imbalance and step time, each with its interval over seeds. Every run resumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdmoe.config_fields import check_tree, setting
from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.arms import Arm, Arms
from sdmoe.experiments.engine import (
    Experiment,
    ExperimentResult,
    PlannedRun,
    Session,
    assign_flags,
    run_config,
    run_probes,
    validate_runs,
    write_tables,
)
from sdmoe.experiments.judging import fmt_value, interval_figure
from sdmoe.experiments.runs import load_imbalance, load_run, median_step_time, steps_ratio
from sdmoe.files import tmp_file_name
from sdmoe.remedies.specialisation import ORTHOGONALITY_TARGET, VARIANCE_TARGET

GUO = {"aux.orthogonality": ORTHOGONALITY_TARGET, "aux.variance": VARIANCE_TARGET}
GLOBAL = {"aux.balance": "global_batch"}
SDMOE = {"method": "sd-moe"}
ARMS = Arms((Arm("plain"), Arm("sd-moe", SDMOE), Arm("ortho-var", GUO), Arm("global-batch", GLOBAL),
             Arm("sd-moe+ortho-var", {**SDMOE, **GUO}), Arm("sd-moe+global-batch", {**SDMOE, **GLOBAL})),
            reference="plain")
CELLS = ("mix", "domain", "copy", "btx")
DOMAINS = ("drama", "encyclopedia", "fairy_tales")
METHODS_FILE = "methods_compare.json"
ANALYSIS_RANK = 4


@dataclass
class MethodsConfig:
    preset: str = setting("demo", label="train preset")  # data, optimiser and loop settings of every run
    hidden_size: int = setting(96, ge=8)  # where our width study found SD-MoE's gain on the mix
    steps: int = setting(400, ge=1)  # a new model's; continued runs take `continue_steps`
    seeds: int = setting(3, ge=2)
    lr: float = setting(3e-3, gt=0)  # the base rate the grid multiplies
    rates: list[float] = setting([0.5, 1.0, 2.0], min_len=1, unique=True, gt=0)
    coefficients: list[float] = setting([0.1, 1.0, 10.0], min_len=1, unique=True, gt=0)  # x the authors' targets
    # points an arm's search may add beyond the grid while its best point has an untried neighbour (`search`)
    extra_points: int = setting(6, ge=0)
    micro_batches: int = setting(4, ge=1)
    domain: str = "drama"  # the one-domain cell's
    cells: list[str] = setting(list(CELLS), min_len=1, unique=True)
    parent_steps: int = setting(400, ge=1)  # the dense parent of the upcycled cells
    finetune_steps: int = setting(200, ge=1)  # each BTX fine-tune of it, on one domain
    continue_steps: int = setting(300, ge=1)  # every arm from an upcycled start
    experts: int = setting(8, ge=2)  # copy's (BTX: one per domain)
    top_k: int = setting(2, ge=1)
    overrides: list[str] = setting([])  # key=value on every run


def _guo(arm: Arm) -> bool:
    return "aux.orthogonality" in arm.sets


@dataclass(frozen=True)
class Tuning:
    """One point of an arm's grid: its rate and its targets' multiplier, as multiples of the base."""

    rate: float = 1.0
    coef: float = 1.0

    @property
    def name(self) -> str:
        return f"lr{self.rate:g}-c{self.coef:g}"


def grid(cfg: MethodsConfig, arm: Arm) -> list[Tuning]:
    """Where an arm's search starts: the rates at the authors' targets, and the targets' multipliers at 1x."""
    points = [Tuning(r, 1.0) for r in cfg.rates]
    if _guo(arm):
        points += [Tuning(1.0, c) for c in cfg.coefficients if c != 1.0]
    return points


def _neighbours(p: Tuning, guo: bool) -> list[Tuning]:
    """Half and twice the rate; for Guo et al.'s arms also a tenth and ten times the targets."""
    def clean(x: float) -> float:  # 0.1 / 10 is 0.01, not 0.010000000000000002: one run directory a point
        return float(f"{x:.6g}")

    out = [Tuning(clean(p.rate / 2), p.coef), Tuning(clean(p.rate * 2), p.coef)]
    if guo:
        out += [Tuning(p.rate, clean(p.coef / 10)), Tuning(p.rate, clean(p.coef * 10))]
    return out


def search(start: list[Tuning], loss: Callable[[Tuning], float], guo: bool, extra: int
           ) -> tuple[list[Tuning], Tuning | None]:
    """An arm's tuning as far as its finished runs go: (the points to have run, the chosen point or None).

    The spec's fair-test rule is a tuned rate, not a grid's edge: while the best point so far has a neighbour
    not yet run (`_neighbours`), that neighbour joins, up to `extra` points beyond `start`; the chosen point is
    then the lowest final loss of all that ran. `loss(p)`: NaN while p's run has not finished (the search waits
    for it), inf for a diverged run."""
    points = list(dict.fromkeys(start))
    while True:
        losses = {p: loss(p) for p in points}
        if any(math.isnan(v) for v in losses.values()):
            return points, None
        best = min(points, key=lambda p: losses[p])
        new = [n for n in _neighbours(best, guo) if n not in losses]
        room = extra - (len(points) - len(start))
        if not new or room <= 0 or not math.isfinite(losses[best]):
            return points, best
        points += new[:room]


# -- run configs ---------------------------------------------------------------------------------------


def _run_config(cfg: MethodsConfig, steps: int, seed: int, domains: list[str] | None = None,
                init: str | None = None, model=None, one_expert: bool = False):
    """A run's config before its arm's transform: a new qwen3_moe, or continued from `init` (`model`: its model
    section while it is not written yet; a start splits at the first step, no warm-up)."""
    new_model = {"model.style": "qwen3_moe", "model.hidden_size": cfg.hidden_size, "model.expert_ffn": cfg.hidden_size}
    if one_expert:  # the dense parent: the router of one expert always weighs it 1
        new_model.update({"model.num_experts": 1, "model.top_k": 1})
    rc = run_config(cfg.preset, list(cfg.overrides), new_model,
                    {"loop.steps": steps, "loop.seed": seed, "optim.lr": cfg.lr, "name": f"seed{seed}",
                     "loop.micro_batches": cfg.micro_batches, "data.domains": list(domains or [])}, init, model)
    rc.loop.monitor_every = max(1, steps // 4)
    rc.loop.eval_every = max(1, steps // 16)  # steps to the reference's loss need evaluations
    return rc


def _tuned(rc, arm: Arm, point: Tuning):
    """The arm's transform, at `point` of its grid."""
    from sdmoe.train.config import set_value

    for key, value in arm.sets.items():
        set_value(rc, key, value * point.coef if key in GUO else value)
    set_value(rc, "optim.lr", rc.optim.lr * point.rate)
    return rc


# -- the experiment ------------------------------------------------------------------------------------


class MethodsCompare(Experiment):
    command, what, settings_file, settings = "methods-compare", "methods compare", METHODS_FILE, MethodsConfig

    # The runs -----------------------------------------------------------------------------------------
    def tuning_runs(self, out: Path | None = None) -> list[PlannedRun]:
        """Every arm's search as far as the finished runs in `out` take it (None: where each search starts)."""
        cfg = self.config
        return [PlannedRun(f"tune/{arm.name}/{p.name}", _tuned(_run_config(cfg, cfg.steps, 0), arm, p),
                           {"cell": "tune", "arm": arm.name, "seed": 0, "rate": p.rate, "coef": p.coef}, ANALYSIS_RANK)
                for arm in ARMS.arms for p in (tuned_points(out, cfg, arm)[0] if out else grid(cfg, arm))]

    def start_runs(self, out: Path, before: bool = False) -> list[PlannedRun]:
        """The dense parent (a one-expert qwen3_moe on the mix) and, for BTX, its fine-tune on each domain
        (`before`: the parent not trained yet, its model section as it will be)."""
        cfg = self.config
        if not {"copy", "btx"} & set(cfg.cells):
            return []
        parent = _run_config(cfg, cfg.parent_steps, 0, one_expert=True)
        runs = [PlannedRun("parent", parent, {"cell": "parent"}, dir="starts/parent")]
        if "btx" in cfg.cells:
            init = str(out / "starts" / "parent" / "model")
            runs += [PlannedRun(f"finetune-{d}", _run_config(cfg, cfg.finetune_steps, 0, [d], init,
                                                              parent.model if before else None),
                                {"cell": "finetune", "domain": d}, dir=f"starts/finetune-{d}") for d in DOMAINS]
        return runs

    def cell_runs(self, out: Path, chosen: dict[str, Tuning], models: dict | None = None) -> list[PlannedRun]:
        """Every cell's arms x seeds (and the reference's seed 0 twice); the mix cell's seed 0 of an arm is its
        grid run at its chosen point, trained once."""
        cfg, runs = self.config, []
        for cell in cfg.cells:
            for arm, seed, run_id in ARMS.planned(cfg.seeds):
                base = arm.name.removesuffix("-rerun")
                point = chosen.get(base, Tuning())
                rc = _tuned(self._cell_config(out, cell, seed, models), ARMS[base], point)
                same_as_tuning = cell == "mix" and seed == 0 and not arm.name.endswith("-rerun")
                runs.append(PlannedRun(f"{cell}/{run_id}", rc, {"cell": cell, "arm": arm.name, "seed": seed},
                                       ANALYSIS_RANK,
                                       dir=f"runs/tune/{base}/{point.name}" if same_as_tuning else ""))
        return runs

    def _cell_config(self, out: Path, cell: str, seed: int, models: dict | None):
        cfg = self.config
        if cell in ("mix", "domain"):
            return _run_config(cfg, cfg.steps, seed, [cfg.domain] if cell == "domain" else None)
        start = out / "checkpoints" / f"{cell}-seed{seed}"
        model = (models or {}).get(cell)
        return _run_config(cfg, cfg.continue_steps, seed, init=str(start), model=model if model else None)

    def start_models(self) -> dict[str, Any]:
        """The model sections of the upcycled starts before they exist (every run checked before the first write)."""
        cfg = self.config
        parent = _run_config(cfg, cfg.parent_steps, 0, one_expert=True).model
        return {"copy": dataclasses.replace(parent, num_experts=cfg.experts, top_k=cfg.top_k),
                "btx": dataclasses.replace(parent, num_experts=len(DOMAINS), top_k=min(cfg.top_k, len(DOMAINS)))}

    # The engine's steps -------------------------------------------------------------------------------
    def check(self, out: Path) -> None:
        cfg = self.config
        check_tree(cfg, "methods")
        unknown = [c for c in cfg.cells if c not in CELLS]
        if unknown:
            raise UserError(f"unknown methods cell {unknown[0]!r}; cells are {', '.join(CELLS)}")
        if cfg.domain not in DOMAINS:
            raise UserError(f"methods domain {cfg.domain!r}: choose one of {', '.join(DOMAINS)}")
        if cfg.top_k > cfg.experts:
            raise UserError(f"top_k={cfg.top_k} exceeds experts={cfg.experts}")
        self._checked = self.tuning_runs() + self.start_runs(out, before=True) + self.cell_runs(out, {},
                                                                                                self.start_models())
        validate_runs(self._checked, self.what)

    def probes(self, out: Path) -> list[str]:
        return run_probes(self._checked) + [tmp_file_name(f"methods.{ext}") for ext in ("json", "md")]

    def execute(self, session: Session) -> None:
        trained: set[str] = set()
        while pending := [r for r in self.tuning_runs(session.out) if r.run_id not in trained]:
            session.train_all(pending, "methods: each arm's rate")  # then the searches go on from their results
            if session.stopped:
                return
            trained |= {r.run_id for r in pending}
        if not self._make_starts(session):
            return
        session.train_all(self.cell_runs(session.out, chosen_points(session.out, self.config)), "methods: the cells")

    def _make_starts(self, session: Session) -> bool:
        from sdmoe.models.upcycle import densify, upcycle

        cfg, out = self.config, session.out
        if not {"copy", "btx"} & set(cfg.cells):
            return True
        parent = self.start_runs(out, before=True)[0]
        if session.train(parent) is None:
            return False
        finetunes = self.start_runs(out)[1:]  # read from the parent now that it exists
        dense = session.checkpoint(out / "checkpoints" / "dense", lambda p: densify(out / parent.dir / "model", p))
        for s in range(cfg.seeds) if "copy" in cfg.cells else ():
            session.checkpoint(out / "checkpoints" / f"copy-seed{s}",
                               lambda p, s=s: upcycle(dense, p, cfg.experts, cfg.top_k, seed=s, progress=False))
        if "btx" in cfg.cells:
            tuned = []
            for run in finetunes:
                if session.train(run) is None:
                    return False
                tuned.append(session.checkpoint(out / "checkpoints" / f"{run.run_id}-dense",
                                                lambda p, run=run: densify(out / run.dir / "model", p)))
            for s in range(cfg.seeds):
                session.checkpoint(out / "checkpoints" / f"btx-seed{s}",
                                   lambda p, s=s: upcycle(dense, p, None, min(cfg.top_k, len(DOMAINS)), seed=s,
                                                          experts_from=tuple(tuned), progress=False))
        return True

    def report(self, out: Path) -> ExperimentResult:
        payload = summarize(out, self.config)
        return write_tables(out, "methods", self.config, payload, render(payload))


def _tuning_loss(out: Path, arm: Arm) -> Callable[[Tuning], float]:
    return lambda p: load_run(out / "runs" / "tune" / arm.name / p.name)["final_mean"]


def tuned_points(out: Path, cfg: MethodsConfig, arm: Arm) -> tuple[list[Tuning], Tuning | None]:
    """The arm's search on the mix (seed 0) as its finished runs in `out` take it (`search`)."""
    return search(grid(cfg, arm), _tuning_loss(out, arm), _guo(arm), cfg.extra_points)


def chosen_points(out: Path, cfg: MethodsConfig) -> dict[str, Tuning]:
    """Each arm's chosen point: the lowest final validation loss of its search on the mix (seed 0); an arm whose
    search has not finished keeps the base (1x, 1x)."""
    return {arm.name: tuned_points(out, cfg, arm)[1] or Tuning() for arm in ARMS.arms}


# -- the report: per cell, per arm, every measured figure -------------------------------------------------

FIGURES = ("steps to plain's loss", "parameter overlap", "output cosine", "I(expert; domain)", "load imbalance",
           "step time / plain")


def _figures(rec: dict, ref: dict | None) -> dict[str, float | None]:
    """One run's figures beside its loss (None where it has none: a single domain has no I(expert; domain))."""
    spec = rec.get("specialisation") or {}
    overlap = [x for x in rec["monitor"]["param_overlap"] if x is not None]
    ratio, time_ratio = None, None
    if ref is not None and rec["status"] == "done" and ref["status"] == "done":
        r, _ = steps_ratio(rec, ref)
        ratio = 1.0 if r is None else r  # never reached: a lower bound of 1.0
        mine, theirs = median_step_time(rec, None), median_step_time(ref, None)
        time_ratio = mine / theirs if math.isfinite(mine) and math.isfinite(theirs) and theirs > 0 else None
    return {"steps to plain's loss": ratio, "parameter overlap": overlap[-1] if overlap else None,
            "output cosine": spec.get("output_cosine_mean"), "I(expert; domain)": spec.get("domain_mi_normalized"),
            "load imbalance": rec.get("imbalance"), "step time / plain": time_ratio}


def _cell(out: Path, cfg: MethodsConfig, cell: str, chosen: dict[str, Tuning]) -> dict[str, Any]:
    runs = MethodsCompare(cfg).cell_runs(out, chosen, MethodsCompare(cfg).start_models())
    recs = {}
    for run in (r for r in runs if r.fields["cell"] == cell):
        rec = load_run(out / run.dir)
        rec["imbalance"] = load_imbalance(out / run.dir)
        recs[(run.fields["arm"], run.fields["seed"])] = rec
    loss = {key: r["final_mean"] for key, r in recs.items()}
    noise = ARMS.same_seed_noise(loss)
    rows = []
    for row in ARMS.judge(loss, cfg.seeds):
        arm = row["arm"]
        gain = row.get("gain", {}).get("mean")
        if row.get("verdict") in (stats.REPRODUCED, stats.NOT_REPRODUCED) and noise is not None and gain is not None \
                and abs(gain) <= noise:  # an interval clear of 0, but no larger than rerunning plain moved it
            row.update(verdict=stats.INCONCLUSIVE, reason=f"the gain is within the same-seed noise ({noise:.4f} nats)")
        per_seed = [_figures(recs[(arm, s)], recs.get((ARMS.reference, s))) for s in range(cfg.seeds)]
        figures = {name: stats.t_interval([f[name] for f in per_seed]).to_dict() for name in FIGURES}
        if cell == "domain":  # one domain: I(expert; domain) is 0 for any router
            figures["I(expert; domain)"] = stats.t_interval([]).to_dict()
        rows.append({**row, "point": asdict(chosen.get(arm, Tuning())), "figures": figures})
    return {"rows": rows, "same_seed_noise": noise}


def summarize(out: Path, cfg: MethodsConfig) -> dict[str, Any]:
    chosen = chosen_points(out, cfg)
    tuning = [{"arm": arm.name, "chosen": asdict(chosen[arm.name]),
               "points": [{**asdict(p), "final": _tuning_loss(out, arm)(p)} for p in tuned_points(out, cfg, arm)[0]]}
              for arm in ARMS.arms]
    cells = {cell: _cell(out, cfg, cell, chosen) for cell in cfg.cells}
    return {"config": asdict(cfg), "reference": ARMS.reference, "tuning": tuning, "cells": cells,
            "when": which_method_when(cells)}


def which_method_when(cells: dict[str, dict]) -> list[str]:
    """One sentence per cell, from the verdicts alone: which arms beat plain, which lost, which are in the noise."""
    words = {"mix": "a new model on mixed text", "domain": "a new model on one domain",
             "copy": "continuing copy-upcycled experts", "btx": "continuing Branch-Train-Mix experts"}
    out = []
    for cell, table in cells.items():
        rows = [r for r in table["rows"] if not r.get("reference")]
        better = sorted((r for r in rows if r.get("verdict") == stats.REPRODUCED), key=lambda r: -r["gain"]["mean"])
        worse = [r["arm"] for r in rows if r.get("verdict") == stats.NOT_REPRODUCED]
        noise = [r["arm"] for r in rows if r.get("verdict") in (stats.INCONCLUSIVE, stats.NOT_MEASURABLE)]
        parts = [("better than plain: " + ", ".join(f"{r['arm']} ({r['gain_figure']})" for r in better))
                 if better else "no arm better than plain beyond the seed-to-seed noise"]
        if worse:
            parts.append("worse: " + ", ".join(worse))
        if noise:
            parts.append("inside the noise: " + ", ".join(noise))
        out.append(f"{words.get(cell, cell)}: " + "; ".join(parts) + ".")
    return out


def render(payload: dict) -> str:
    cfg = payload["config"]
    lines = [f"# Which specialisation method? SD-MoE head to head (qwen3_moe, d = {cfg['hidden_size']})", "",
             f"{cfg['seeds']} paired seeds a cell, {cfg['micro_batches']} micro-batches a step; new models "
             f"{cfg['steps']} steps, upcycled starts {cfg['continue_steps']} (parent {cfg['parent_steps']}, BTX "
             f"fine-tunes {cfg['finetune_steps']} a domain). Gain: plain's final validation loss minus the arm's "
             "(nats, > 0: the arm is better), mean [95% t-interval]; better / worse when the whole interval lies "
             "above / below 0, else inside the noise.", "",
             "**In short.** " + " ".join(s[0].upper() + s[1:] for s in payload["when"]), "",
             "## Each arm's rate and targets (seed 0 on the mix; final validation loss)", "",
             f"Each arm's search starts from the rates {', '.join(f'{r:g}x' for r in cfg['rates'])} of "
             f"{cfg['lr']:g} (and, with Guo et al.'s terms, their targets at "
             f"{', '.join(f'{c:g}x' for c in cfg['coefficients'])} the authors'), then adds the best point's "
             "untried neighbours (half and twice the rate, a tenth and ten times the targets; at most "
             f"{cfg['extra_points']} points) until the best has none: a tuned point, not a grid's edge.", ""]
    lines += ["| arm | final loss at each point tried (rate, targets: x the base) | chosen |", "|---|---|---|"]
    for t in payload["tuning"]:
        tried = sorted(t["points"], key=lambda p: (p["coef"], p["rate"]))
        ch = t["chosen"]
        points = "; ".join(f"{p['rate']:g}x, {p['coef']:g}x: {fmt_value(p['final'])}" for p in tried)
        lines.append(f"| {t['arm']} | {points} | {ch['rate']:g}x, {ch['coef']:g}x |")
    for cell, table in payload["cells"].items():
        noise = fmt_value(table["same_seed_noise"], ".4f")
        lines += ["", f"## {cell}", "", f"same-seed noise (plain, seed 0 twice): {noise} nats", "",
                  "| arm | final loss | gain over plain | verdict | " + " | ".join(FIGURES) + " |",
                  "|---" * (4 + len(FIGURES)) + "|"]
        for r in table["rows"]:
            gain, verdict = (("(reference)", "-") if r.get("reference") else
                             (r["gain_figure"], {stats.REPRODUCED: "better", stats.NOT_REPRODUCED: "worse"}.get(
                                 r["verdict"], "inside the noise")))
            figs = " | ".join(interval_figure(r["figures"][f], ".3f", count=False, empty="-") for f in FIGURES)
            lines.append(f"| {r['arm']} | {interval_figure(r['value'], count=False)} | {gain} | {verdict} | {figs} |")
    lines += ["", "## Which method when (from the verdicts above)", ""] + [f"- {s}" for s in payload["when"]]
    lines += ["", "Steps: the first evaluation at which the arm's validation loss reaches plain's final one (same "
              "seed), / the steps (1.0: not before the end). Parameter overlap: the experts' mean top-4 subspace "
              "overlap at the last monitor record. Output cosine: mean cosine of the experts' outputs on the same "
              "tokens (post-hoc analysis of the final model). Load imbalance: the busiest expert's share x E, last "
              "logged window. Step time: the runs' own median step times, paired by seed (one run against another: "
              "noisy on a shared machine)."]
    return "\n".join(lines) + "\n"


# -- flags: what `sdmoe methods-compare` (and `compare --preset methods`) set -------------------------------

FLAGS = ("seeds", "steps", "overrides")


def apply_flags(cfg: MethodsConfig, flags: dict[str, Any]) -> MethodsConfig:
    return assign_flags(cfg, flags, ("seeds", "steps"))
