"""Arms: an experiment declared as named run-config transforms, judged against a reference arm.

    class Remedies(ArmsExperiment):                    # a whole experiment, declared
        command, what, settings_file, settings = "remedies", "remedies compare", "remedies.json", RemediesConfig
        arms = Arms((Arm("baseline"), Arm("sd-moe", {"method": "sd-moe"}),
                     Arm("ortho", {"aux.orthogonality": 1e-4}),
                     Arm("ortho+sd-moe", {"aux.orthogonality": 1e-4, "method": "sd-moe"}),
                     Arm("global-batch", {"aux.balance": "global_batch"})), reference="baseline")

        def config_of(self, arm, seed, out, model=None):  # a run's config before its arm's transform
            return my_run_config(self.config, seed)

    run_experiment(Remedies(RemediesConfig(seeds=3)), "runs/remedies")   # checked, trained, resumable, judged

Every arm runs every seed from the same start (weights and data order per seed), so two arms of one
seed differ only by their transform; the reference's seed 0 runs twice (`<reference>-rerun`), and that
pair's difference is the same-seed noise every gain is read beside. A figure is {(arm, seed): value};
lower is better (a loss) unless `lower_is_better=False`. `ArmsExperiment` writes one table per figure
(the final validation loss by default; `figures` adds more): each arm's value, its gain over the
reference with its 95% interval and verdict. `sdmoe upcycle-compare` and `sdmoe finetune-compare` are
declared this way (their starts made in `prepare`, their own tables in `report`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdmoe.config_fields import check_tree
from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.engine import (
    Experiment,
    ExperimentResult,
    PlannedRun,
    Session,
    run_probes,
    validate_runs,
)
from sdmoe.experiments.judging import gain_row, interval_figure
from sdmoe.files import tmp_file_name, write_json_atomic, write_text_atomic

RERUN = "-rerun"


@dataclass(frozen=True)
class Arm:
    """One arm: its name, the dotted keys it sets on the run config (`train.config.set_value`), and the
    start checkpoint it continues from, by the name its experiment gives it (None: the experiment's own)."""

    name: str
    sets: dict[str, Any] = field(default_factory=dict)
    start: str | None = None


@dataclass(frozen=True)
class Arms:
    arms: tuple[Arm, ...]
    reference: str  # every gain is over this arm, paired by seed
    rerun_reference: bool = True  # the reference's seed 0 trained twice: the same-seed noise

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names) or self.reference not in names:
            raise UserError(f"arms {names}: names must be unique and include the reference {self.reference!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(a.name for a in self.arms)

    def __getitem__(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def rerun(self) -> str:
        return self.reference + RERUN

    def planned(self, seeds: int) -> list[tuple[Arm, int, str]]:
        """(arm, seed, run id) of every run, seed by seed, the reference's rerun last."""
        out = [(arm, s, f"{arm.name}/seed{s}") for s in range(seeds) for arm in self.arms]
        if self.rerun_reference:
            ref = self[self.reference]
            out.append((Arm(self.rerun, ref.sets, ref.start), 0, f"{self.rerun}/seed0"))
        return out

    def runs(self, seeds: int, config_of: Callable[[Arm, int], Any],
             analysis_rank: Callable[[Arm], int | None] = lambda arm: None) -> list[PlannedRun]:
        """Every run: `config_of(arm, seed)` is the run's config before the arm's transform; the transform
        (`arm.sets`) is applied here, so two arms of one seed differ by it alone."""
        from sdmoe.train.config import set_value

        runs = []
        for arm, seed, run_id in self.planned(seeds):
            rc = config_of(arm, seed)
            for key, value in arm.sets.items():
                set_value(rc, key, value)
            runs.append(PlannedRun(run_id, rc, {"arm": arm.name, "seed": seed}, analysis_rank(arm)))
        return runs

    def paired(self, figure: dict[tuple[str, int], float], arm: str, seeds: int, against: str | None = None,
               lower_is_better: bool = True) -> dict[int, float]:
        """{seed: gain of `arm` over `against` (the reference)}, over the seeds where both are finite;
        > 0: `arm` is better."""
        against = against or self.reference
        out = {}
        for s in range(seeds):
            a, b = figure.get((arm, s)), figure.get((against, s))
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                out[s] = (b - a) if lower_is_better else (a - b)
        return out

    def same_seed_noise(self, figure: dict[tuple[str, int], float]) -> float | None:
        """|the reference's seed 0 - its rerun|: the difference that no arm's transform made."""
        a, b = figure.get((self.reference, 0)), figure.get((self.rerun, 0))
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return None
        return abs(a - b)

    def judge(self, figure: dict[tuple[str, int], float], seeds: int, lower_is_better: bool = True) -> list[dict]:
        """One row per arm: its own values' interval, and its gain over the reference (paired by seed, 95%
        interval, verdict: better when the whole interval lies above 0, worse when below); the reference's
        row carries no gain."""
        rows = []
        for arm in self:
            own = stats.t_interval([figure.get((arm, s)) for s in range(seeds)]).to_dict()
            row = {"arm": arm, "value": own, "reference": arm == self.reference}
            if arm != self.reference:
                row.update(gain_row(self.paired(figure, arm, seeds, lower_is_better=lower_is_better)))
            rows.append(row)
        return rows


class ArmsExperiment(Experiment):
    """An experiment of `arms` x `config.seeds`: set `arms` and implement `config_of`; `prepare` makes what the
    runs start from (a parent, upcycled checkpoints), `start_models` says their model sections before they
    exist (so every run is checked before the first write), `figures` measures more than the final loss."""

    arms: Arms
    analysis_rank: int | None = None  # analyse each final model at this rank (routing, domain MI)
    stem = ""  # its report files: <stem>.json, <stem>.md (default: the command's name)

    def config_of(self, arm: Arm, seed: int, out: Path, model=None):
        """The run's config before its arm's transform; `model`: its start's model section while that start
        does not exist yet (from `start_models`), None once it does."""
        raise NotImplementedError

    def start_models(self, out: Path) -> dict[str | None, Any]:
        """{start name: the model section `train --init` will read from it}, for starts made in `prepare`."""
        return {}

    def analysis_rank_of(self, arm: Arm) -> int | None:
        return self.analysis_rank

    def runs(self, out: Path, models: dict[str | None, Any] | None = None) -> list[PlannedRun]:
        models = models or {}
        return self.arms.runs(self.config.seeds, lambda arm, s: self.config_of(arm, s, out, models.get(arm.start)),
                              self.analysis_rank_of)

    def prepare(self, session: Session) -> bool:
        """Make the runs' starts; False when `max_runs` stopped the session first."""
        return True

    def check(self, out: Path) -> None:
        check_tree(self.config, self.command.removesuffix("-compare"))
        self._checked = self.extra_runs() + self.runs(out, self.start_models(out))
        validate_runs(self._checked, self.what)

    def extra_runs(self) -> list[PlannedRun]:
        """Runs `prepare` trains before the arms (a parent, a base), checked with them."""
        return []

    def probes(self, out: Path) -> list[str]:
        stem = self.stem or self.command
        return run_probes(self._checked) + [tmp_file_name(f"{stem}.{ext}") for ext in ("json", "md")]

    def execute(self, session: Session) -> None:
        if self.prepare(session):
            session.train_all(self.runs(session.out), self.what)

    def figures(self, out: Path) -> dict[str, dict[tuple[str, int], float]]:
        """{figure name: {(arm, seed): value}}, lower is better; the final mean validation loss by default."""
        from sdmoe.experiments.runs import load_run

        return {"final validation loss": {(arm.name, s): load_run(out / "runs" / run_id)["final_mean"]
                                          for arm, s, run_id in self.arms.planned(self.config.seeds)}}

    def report(self, out: Path) -> ExperimentResult:
        seeds = self.config.seeds
        tables = {name: {"rows": self.arms.judge(figure, seeds), "same_seed_noise": self.arms.same_seed_noise(figure)}
                  for name, figure in self.figures(out).items()}
        payload = {"config": dataclasses.asdict(self.config), "reference": self.arms.reference, "tables": tables}
        stem = self.stem or self.command
        write_json_atomic(out / f"{stem}.json", payload)
        text = render_tables(self.what, payload)
        write_text_atomic(out / f"{stem}.md", text)
        return ExperimentResult(out, self.config, text, payload, out / f"{stem}.md")


def render_tables(title: str, payload: dict) -> str:
    """One markdown table per figure: each arm's value, its gain over the reference, the verdict."""
    ref = payload["reference"]
    lines = [f"# {title}", "", f"Gain: {ref}'s value minus the arm's (> 0: the arm is better), paired by seed, "
             "mean [95% t-interval]; verdict: better / worse when the whole interval lies above / below 0."]
    words = {stats.REPRODUCED: "better", stats.NOT_REPRODUCED: "worse"}
    for name, table in payload["tables"].items():
        noise = table["same_seed_noise"]
        lines += ["", f"## {name}", "", f"same-seed noise ({ref} seed 0 twice): "
                  + ("-" if noise is None else f"{noise:.4f}"), "", f"| arm | {name} | gain over {ref} | verdict |",
                  "|---|---|---|---|"]
        for r in table["rows"]:
            gain, verdict = ("(reference)", "-") if r["reference"] else (r["gain_figure"],
                                                                           words.get(r["verdict"], r["verdict"]))
            lines.append(f"| {r['arm']} | {interval_figure(r['value'], count=False)} | {gain} | {verdict} |")
    return "\n".join(lines) + "\n"
