"""The plan of a compare: matched runs of the baseline, SD-MoE, its control and ablations.

    cfg = compare_preset("demo")
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
from dataclasses import dataclass, field
from typing import Any

from sdmoe.errors import UserError

# Variants every compare knows by name; parametrised ones (rank-<r>, tail-lr-<m>,
# shared-lr-<m>, reestimate-<k>, tracker-<n>) are parsed by `variant_overrides`.
FIXED_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"method": "baseline"},
    # The same run as baseline seed 0, trained again: the same-seed noise every difference is read against.
    "baseline-rerun": {"method": "baseline"},
    "sd-moe": {"method": "sd-moe"},  # the default SDMoEConfig
    # The control: same reparameterisation W_i = W_s + T_i, plain gradients.
    "control": {"method": "sd-moe", "sdmoe.gradient_split": "none"},
    "fixed-weights": {"method": "sd-moe", "sdmoe.gradient_split": "fixed", "sdmoe.shared_form": "lowrank",
                      "sdmoe.basis_source": "weights"},
    "fixed-gradients": {"method": "sd-moe", "sdmoe.gradient_split": "fixed", "sdmoe.shared_form": "lowrank",
                        "sdmoe.basis_source": "gradients"},
    "per-expert": {"method": "sd-moe", "sdmoe.mode": "per_expert"},
    "router-residual": {"method": "sd-moe", "sdmoe.router_input": "residual"},
    "normalized-tails": {"method": "sd-moe", "sdmoe.normalize_tail_updates": True},
}
_PARAM_VARIANTS = {
    "rank": ("sdmoe.rank", int),
    "tail-lr": ("sdmoe.lr_tail_mult", float),
    "shared-lr": ("sdmoe.lr_shared_mult", float),
    "tracker": ("sdmoe.tracker_iters", int),
}
_PARAM_RE = re.compile(r"^(rank|tail-lr|shared-lr|tracker|reestimate)-([0-9]+(?:\.[0-9]+)?)$")


def variant_overrides(name: str) -> dict[str, Any]:
    """The dotted-key overrides (on `method` and `sdmoe.*`) that define variant `name`."""
    if name in FIXED_VARIANTS:
        return dict(FIXED_VARIANTS[name])
    m = _PARAM_RE.match(name)
    if m:
        kind, raw = m.groups()
        if kind == "reestimate":
            # A basis from gradients, re-estimated every K steps, tails projected against it.
            return {"method": "sd-moe", "sdmoe.gradient_split": "fixed", "sdmoe.shared_form": "lowrank",
                    "sdmoe.basis_source": "gradients", "sdmoe.reestimate_every": int(float(raw))}
        key, typ = _PARAM_VARIANTS[kind]
        value = typ(float(raw)) if typ is int else typ(raw)
        return {"method": "sd-moe", key: value}
    known = ", ".join(list(FIXED_VARIANTS) + ["rank-<r>", "tail-lr-<m>", "shared-lr-<m>", "tracker-<n>",
                                              "reestimate-<k>"])
    raise UserError(f"unknown compare variant {name!r}; choose from {known}")


def fmt_mult(m: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": the LR multiplier as it appears in run ids."""
    return f"{float(m):g}"


@dataclass
class CompareConfig:
    preset: str = "demo"  # the train preset every run starts from
    styles: list[str] = field(default_factory=lambda: ["qwen2_moe", "deepseek_v3"])
    seeds: int = 3
    variants: list[str] = field(default_factory=lambda: ["baseline", "sd-moe", "control"])
    # Multiples of the preset's (tuned) rate: 0.5 shows the baseline is tuned, 4 tests "stable up to 4x".
    lr_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    lr_sweep_styles: int = 1  # how many styles (first N) get the LR sweep; 0 = none
    lr_sweep_seeds: int = 1  # how many seeds (first N) get the LR sweep
    lr_sweep_variants: list[str] = field(default_factory=lambda: ["baseline", "sd-moe"])
    rank_sweep: list[int] = field(default_factory=list)  # -> variants rank-<r>
    ablations: list[str] = field(default_factory=list)  # further variant names, at lr 1x
    ablation_styles: int = 0  # how many styles get the rank sweep / ablations; 0 = all
    ablation_seeds: int = 0  # how many seeds; 0 = all
    steps: int = 0  # 0 = the preset's loop.steps
    overrides: list[str] = field(default_factory=list)  # "key=value" applied to every run (e.g. loop.threads=2)
    text: list[str] = field(default_factory=list)  # user text (data.text); empty = bundled corpora
    analyze: bool = True  # post-hoc routing analysis of each final model (expert load, domain MI)
    rerun_baseline: bool = True  # train the first style's baseline seed 0 twice: the same-seed noise

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CompareConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise UserError(f"unknown compare setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        return cls(**raw)

    def validate(self) -> "CompareConfig":
        from sdmoe.models import STYLES
        from sdmoe.train.config import PRESETS

        if self.preset not in PRESETS:
            raise UserError(f"unknown train preset {self.preset!r} for compare; choose one of {', '.join(PRESETS)}")
        if not self.styles:
            raise UserError("compare needs at least one model style, e.g. --styles qwen2_moe")
        for s in self.styles:
            if s not in STYLES:
                raise UserError(f"unknown model style {s!r}; choose from {', '.join(STYLES)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise UserError(f"compare seeds must be a positive integer, got {self.seeds!r}")
        if "baseline" not in self.variants:
            raise UserError("compare variants must include 'baseline': every difference is measured against it")
        for v in list(self.variants) + list(self.ablations) + list(self.lr_sweep_variants):
            variant_overrides(v)
        for r in self.rank_sweep:
            if not isinstance(r, int) or r < 1:
                raise UserError(f"rank_sweep holds {r!r}; ranks are positive integers (1..d-1)")
        if not self.lr_multipliers or any(not isinstance(m, (int, float)) or m <= 0 for m in self.lr_multipliers):
            raise UserError(f"lr_multipliers must be positive numbers, got {self.lr_multipliers!r}")
        if 1 not in [float(m) for m in self.lr_multipliers]:
            raise UserError("lr_multipliers must include 1 (the tuned rate every other rate is relative to)")
        if self.steps < 0:
            raise UserError(f"compare steps must be >= 0 (0 = the preset's), got {self.steps}")
        for item in self.overrides:
            if "=" not in item:
                raise UserError(f"compare override {item!r} is not key=value (e.g. loop.threads=2)")
        return self


def compare_preset(name: str) -> CompareConfig:
    """`demo`: ~10 min on 2 CPU cores; `paper`: the full grid (hours on CPU); `tiny`: tests."""
    if name == "demo":
        # The variant that won the tuned-rate search at this scale, beside the default (docs/results.md).
        return CompareConfig(ablations=["fixed-weights"], ablation_styles=1)
    if name == "paper":
        return CompareConfig(
            preset="small",
            styles=["qwen2_moe", "deepseek_v3"],
            seeds=3,
            variants=["baseline", "sd-moe", "control"],
            lr_multipliers=[0.5, 1.0, 2.0, 4.0],
            lr_sweep_styles=2,
            lr_sweep_seeds=3,
            lr_sweep_variants=["baseline", "sd-moe", "control"],
            rank_sweep=[4, 8, 16, 64],  # d=128: 4..d/2; d/4 = 32 is the sd-moe row itself
            ablations=["fixed-weights", "reestimate-50", "per-expert", "router-residual", "normalized-tails",
                       "tail-lr-2", "shared-lr-2", "tracker-2"],
        )
    if name == "tiny":
        return CompareConfig(preset="tiny", styles=["qwen2_moe"], seeds=2, variants=["baseline", "sd-moe"],
                             lr_multipliers=[1.0], lr_sweep_styles=0, analyze=False)
    raise UserError(f"unknown compare preset {name!r}; choose demo, paper or tiny")


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
        from sdmoe.train.config import apply_overrides, preset, set_value

        cfg = cfg or CompareConfig()
        rc = preset(cfg.preset)
        apply_overrides(rc, list(cfg.overrides))
        for key, value in self.overrides.items():
            set_value(rc, key, value)
        return rc


def _run(cfg: CompareConfig, base_lr: float, style: str, variant: str, seed: int, lr_mult: float) -> RunSpec:
    ov: dict[str, Any] = {
        "name": f"{style}/{variant}/lr{fmt_mult(lr_mult)}/seed{seed}",
        "model.style": style,
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
    """
    from sdmoe.train.config import apply_overrides, preset

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
    return specs
