"""Arms: an experiment declared as named run-config transforms, judged against a reference arm.

    ARMS = Arms((Arm("baseline"), Arm("sd-moe", {"method": "sd-moe"}),
                 Arm("ortho", {"remedies.orthogonality": 1e-2})), reference="baseline")
    runs = ARMS.runs(seeds=3, config_of=lambda arm, seed: my_run_config(arm, seed))   # PlannedRun per arm x seed
    ...                                     # the engine trains them (`engine.Session.train_all`)
    rows = ARMS.judge(final_losses, seeds=3)   # every arm against the reference, paired by seed

Every arm runs every seed from the same start (weights and data order per seed), so two arms of one
seed differ only by their transform; the reference's seed 0 runs twice (`<reference>-rerun`), and that
pair's difference is the same-seed noise every gain is read beside. A figure is {(arm, seed): value};
lower is better (a loss) unless `lower_is_better=False`. `sdmoe upcycle-compare` and
`sdmoe finetune-compare` are declared this way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.engine import PlannedRun
from sdmoe.experiments.judging import gain_row

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

    def runs(self, seeds: int, config_of: Callable[[Arm, int], Any], analysis_rank: Callable[[Arm], int | None]
             = lambda arm: None) -> list[PlannedRun]:
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
