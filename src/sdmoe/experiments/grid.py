"""The plan of a compare: matched runs of the baseline, SD-MoE, its control and ablations.

    cfg = presets.configure("compare", "demo", {}).config   # or CompareConfig(...) itself
    for spec in plan(cfg):
        spec.run_id        # "qwen2_moe/sd-moe/lr1/seed0"
        spec.run_config()  # the full RunConfig of that run

Pairing: runs that share (style, seed, lr_mult) start from the same initial
weights and see the same batches in the same order (`train()` seeds both the
model and the data order from `loop.seed`); they differ only in `method` and
the `sdmoe` section. Every variant is a named set of overrides of those two.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from sdmoe.config_fields import assign, check_tree, setting
from sdmoe.errors import UserError
from sdmoe.models.config import Style
from sdmoe.train.config import (
    PresetName,
    RunConfig,
    apply_overrides,
    parse_setting,
    preset,
    set_value,
    start_from_checkpoint,
    validate,
)

# The paper's own split (spec, "What the paper's own text says").
_PAPER = {"method": "sd-moe", "sdmoe.form": "full", "sdmoe.gradient_split": "fixed", "sdmoe.projection_sides": "two",
          "sdmoe.basis_source": "shared", "sdmoe.basis_method": "randomized", "sdmoe.refresh_every": 16,
          "sdmoe.rank": 8, "sdmoe.split_step": 0}
# Variants every compare knows by name; parametrised ones (rank-<r>, shared-lr-<m>, reestimate-<k>,
# tracker-<n>) are parsed by `variant_overrides`. Removed in 0.3 (docs/CHANGELOG.md, with the figures that
# decided): router-residual, normalized-tails, tracker-lag, tail-lr-<m>.
FIXED_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"method": "baseline"},
    # The same run as baseline seed 0, trained again: the same-seed noise every difference is read against.
    "baseline-rerun": {"method": "baseline"},
    "sd-moe": {"method": "sd-moe"},  # the default SDMoEConfig
    # The control: same reparameterisation W_i = W_s + T_i, plain gradients.
    "control": {"method": "sd-moe", "sdmoe.gradient_split": "none"},
    "fixed-weights": {"method": "sd-moe", "sdmoe.gradient_split": "fixed", "sdmoe.form": "lowrank",
                      "sdmoe.basis_source": "weights"},
    "fixed-gradients": {"method": "sd-moe", "sdmoe.gradient_split": "fixed", "sdmoe.form": "lowrank",
                        "sdmoe.basis_source": "gradients"},
    "per-expert": {"method": "sd-moe", "sdmoe.form": "per_expert"},
    # The paper's own split (spec, "What the paper's own text says"): from scratch, two-sided fixed bases
    # from the shared weight's top-8 singular vectors by a randomized range finder, refreshed every 16 steps.
    "paper": _PAPER,
    # ... and the ablations that say which of its choices matters
    "paper-one-sided": {**_PAPER, "sdmoe.projection_sides": "one"},
    "paper-refresh-1": {**_PAPER, "sdmoe.refresh_every": 1},
    "paper-no-refresh": {**_PAPER, "sdmoe.refresh_every": 0},
    "paper-rank-d4": {**_PAPER, "sdmoe.rank": 0},
    "paper-after-warmup": {k: v for k, v in _PAPER.items() if k != "sdmoe.split_step"},
}
_PARAM_VARIANTS = {
    "rank": "sdmoe.rank",
    "shared-lr": "sdmoe.lr_shared_mult",
    "tracker": "sdmoe.tracker_iters",
    "reestimate": "sdmoe.reestimate_every",
}
_PARAM_RE = re.compile(r"^(rank|shared-lr|tracker|reestimate)-([0-9]+(?:\.[0-9]+)?)$")
VARIANT_NAMES = (*FIXED_VARIANTS, "rank-<r>", "shared-lr-<m>", "tracker-<n>", "reestimate-<k>")  # what --help lists


def variant_overrides(name: str) -> dict[str, Any]:
    """The dotted-key overrides (on `method` and `sdmoe.*`) that define variant `name`."""
    if name in FIXED_VARIANTS:
        return dict(FIXED_VARIANTS[name])
    m = _PARAM_RE.match(name)
    if m:
        kind, raw = m.groups()
        key = _PARAM_VARIANTS[kind]
        try:  # the value as the field declares it: rank-4.5 is an error, not rank 4
            value = parse_setting(key, raw)
        except UserError as e:
            raise UserError(f"compare variant {name!r}: {e}") from None
        if kind == "reestimate":
            # A basis from gradients, re-estimated every K steps, tails projected against it.
            return {"method": "sd-moe", "sdmoe.gradient_split": "fixed", "sdmoe.form": "lowrank",
                    "sdmoe.basis_source": "gradients", key: value}
        return {"method": "sd-moe", key: value}
    raise UserError(f"unknown compare variant {name!r}; choose from {', '.join(VARIANT_NAMES)}")


def variant_sdmoe_config(name: str, split_step: int = 0):
    """The SDMoEConfig a compare variant trains with, split at `split_step` (benchmarks and tests drive
    the controller directly); None for a baseline."""
    overrides = variant_overrides(name)
    if overrides.get("method", "sd-moe") == "baseline":
        return None
    run = RunConfig()
    for key, value in overrides.items():
        if key != "method":
            set_value(run, key, value)
    run.sdmoe.split_step = split_step
    return run.sdmoe


def fmt_mult(m: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": the LR multiplier as it appears in run ids."""
    return f"{float(m):g}"


@dataclass
class CompareConfig:
    preset: PresetName = setting("demo", label="train preset")  # the train preset every run starts from
    styles: list[Style] = setting(["qwen2_moe", "deepseek_v3"], min_len=1, unique=True, label="model style")
    seeds: int = setting(3, ge=1)
    variants: list[str] = setting(["baseline", "sd-moe", "control"], min_len=1)
    # Multiples of the preset's (tuned) rate: 0.5 shows the baseline is tuned, 4 tests "stable up to 4x".
    lr_multipliers: list[float] = setting([0.5, 1.0, 2.0, 4.0], gt=0, min_len=1)
    lr_sweep_styles: int = setting(1, ge=0, note="0 = none")  # how many styles (first N) get the LR sweep
    lr_sweep_seeds: int = setting(1, ge=0, note="0 = none")  # how many seeds (first N) get the LR sweep
    lr_sweep_variants: list[str] = setting(["baseline", "sd-moe"])
    rank_sweep: list[int] = setting([], ge=1)  # -> variants rank-<r>
    ablations: list[str] = setting([])  # further variant names, at lr 1x
    ablation_styles: int = setting(0, ge=0, note="0 = all")  # how many styles get the rank sweep / ablations
    ablation_seeds: int = setting(0, ge=0, note="0 = all")  # how many seeds
    steps: int = setting(0, ge=0, note="0 = the preset's loop.steps")
    overrides: list[str] = setting([])  # "key=value" applied to every run (e.g. loop.threads=2)
    text: list[str] = setting([])  # user text (data.text); empty = bundled corpora
    # a local transformers MoE checkpoint every run starts from (`train --init`); styles is then its own
    init: str = ""
    analyze: bool = True  # post-hoc routing analysis of each final model (expert load, domain MI)
    rerun_baseline: bool = True  # train the first style's baseline seed 0 twice: the same-seed noise
    # Claim (e): baseline and SD-MoE steps interleaved, in this many fresh processes one after the
    # other (the ratio moves more between processes than within one), each timing this many rounds.
    # No run depends on them, so a resumed compare may change them (resume="any").
    # Also compare baseline and SD-MoE on each domain of the text alone (sub-compares in OUT/texts/<domain>,
    # first style, same seeds): the report then opens with the gain per text. It adds compares, not runs
    # of this grid, so a resume may turn it on or off.
    per_text: bool = setting(False, resume="any")
    # the domains that get such a sub-compare; empty = every domain of the text (resume="any" as per_text)
    per_text_domains: list[str] = setting([], unique=True, resume="any")
    timing_processes: int = setting(4, ge=0, note="0 = no timing; claim (e) is then not measurable", resume="any")
    timing_rounds: int = setting(6, ge=2, resume="any")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CompareConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise UserError(f"unknown compare setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        cfg = cls()
        for key, value in raw.items():  # each value converted to its declared type and range-checked
            assign(cfg, key, value)
        return cfg

    def validate(self) -> "CompareConfig":
        """Every field against its declaration (prefix "compare"), then the rules between fields."""
        check_tree(self, "compare")
        if "baseline" not in self.variants:
            raise UserError("compare variants must include 'baseline': every difference is measured against it")
        for v in list(self.variants) + list(self.ablations) + list(self.lr_sweep_variants):
            variant_overrides(v)
        if 1.0 not in self.lr_multipliers:
            raise UserError("lr_multipliers must include 1 (the tuned rate every other rate is relative to)")
        for item in self.overrides:
            if "=" not in item:
                raise UserError(f"compare override {item!r} is not key=value (e.g. loop.threads=2)")
        return self


@dataclass(frozen=True)
class RunSpec:
    style: str
    variant: str
    seed: int
    lr_mult: float
    overrides: dict[str, Any]  # dotted key -> value, the whole difference from the preset

    @property
    def run_id(self) -> str:
        return f"{self.style}/{self.variant}/lr{fmt_mult(self.lr_mult)}/seed{self.seed}"

    @property
    def pair_key(self) -> tuple[str, int, str]:
        """Runs with the same key share initial weights and data order."""
        return (self.style, self.seed, fmt_mult(self.lr_mult))

    def run_config(self, cfg: CompareConfig | None = None):
        """The RunConfig of this run: the preset, the compare's own overrides, then this run's."""
        cfg = cfg or CompareConfig()
        rc = preset(cfg.preset)
        if self.overrides.get("init"):
            start_from_checkpoint(rc, self.overrides["init"], list(cfg.overrides))
        apply_overrides(rc, list(cfg.overrides))
        for key, value in self.overrides.items():
            if key != "init":
                set_value(rc, key, value)
        return rc


def _run(cfg: CompareConfig, base_lr: float, style: str, variant: str, seed: int, lr_mult: float) -> RunSpec:
    ov: dict[str, Any] = {
        "name": f"{style}/{variant}/lr{fmt_mult(lr_mult)}/seed{seed}",
        # from a checkpoint, every run of a pair starts from its weights (the seed sets the data order)
        **({"init": cfg.init} if cfg.init else {"model.style": style}),
        "loop.seed": seed,
        "optim.lr": base_lr * float(lr_mult),
    }
    if cfg.steps:
        ov["loop.steps"] = cfg.steps
    if cfg.text:
        ov["data.text"] = list(cfg.text)
    ov.update(variant_overrides(variant))
    return RunSpec(style, variant, seed, float(lr_mult), ov)


def plan(cfg: CompareConfig) -> list[RunSpec]:
    """Every run of the compare, in the order they run (main grid, LR sweep, ablations); no duplicates.

    Main grid: every style x seed x variant at 1x the preset's learning rate.
    LR sweep: `lr_sweep_variants` at every other multiplier, on the first
    `lr_sweep_styles` styles and `lr_sweep_seeds` seeds. Ablations (rank sweep
    + named ablations) at 1x on the first `ablation_styles` / `ablation_seeds`.
    Every run's config is validated here, before a compare trains (or writes) anything.
    """
    cfg.validate()
    base = apply_overrides(preset(cfg.preset), list(cfg.overrides))
    base_lr = base.optim.lr
    seeds = list(range(cfg.seeds))
    specs: list[RunSpec] = []
    seen: set[str] = set()

    def add(style: str, variant: str, seed: int, mult: float) -> None:
        spec = _run(cfg, base_lr, style, variant, seed, mult)
        if spec.run_id not in seen:
            seen.add(spec.run_id)
            specs.append(spec)

    for style in cfg.styles:
        for seed in seeds:
            for variant in cfg.variants:
                add(style, variant, seed, 1.0)
    if cfg.rerun_baseline:
        add(cfg.styles[0], "baseline-rerun", 0, 1.0)
    for style in cfg.styles[: cfg.lr_sweep_styles]:
        for seed in seeds[: cfg.lr_sweep_seeds]:
            for mult in cfg.lr_multipliers:
                for variant in cfg.lr_sweep_variants:
                    add(style, variant, seed, float(mult))
    ablations = [f"rank-{r}" for r in cfg.rank_sweep] + list(cfg.ablations)
    if ablations:
        for style in cfg.styles[: cfg.ablation_styles or None]:
            for seed in seeds[: cfg.ablation_seeds or None]:
                add(style, "baseline", seed, 1.0)  # every ablation has its paired baseline
                for variant in ablations:
                    add(style, variant, seed, 1.0)
    for spec in specs:
        try:
            validate(spec.run_config(cfg))
        except UserError as e:
            raise UserError(f"compare run {spec.run_id}: {e}") from None
    return specs
