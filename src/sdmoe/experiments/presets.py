"""Every experiment preset in one registry, and the one way a command line becomes an experiment.

    experiment = configure("compare", "demo", {"seeds": 2})     # the preset's settings, then the flags
    result = run_experiment(experiment, "runs/compare-demo")    # `engine.run_experiment`

A preset names its command (`sdmoe compare`, `sdmoe study`, `sdmoe upcycle-compare`,
`sdmoe finetune-compare`), what it runs and how long it takes (its `--help` says so), and builds the
settings of that command's experiment. A command (`Kind`) names its experiment class, the flags it takes
and how they set its settings. The old spelling `sdmoe compare --preset upcycle|finetune[-tiny]` still
runs those experiments (the preset says which), with the flags they take; a flag they do not take is
refused in one line. Light to import: the experiments' modules load when one is configured.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdmoe.errors import UserError


@dataclass(frozen=True)
class Kind:
    """One experiment command: its module (with `FLAGS`, `apply_flags` and the experiment class), and why an
    old `compare --preset` spelling of it cannot take a flag of the compare's."""

    command: str
    module: str  # sdmoe.experiments.<module>
    experiment: str  # its class there
    about: str
    refused: dict[str, str]  # compare flag -> why this experiment takes none

    def load(self):
        return importlib.import_module(f"sdmoe.experiments.{self.module}")


@dataclass(frozen=True)
class Preset:
    name: str
    command: str
    about: str  # what it runs and how long it takes: the --help line
    build: Callable[[], Any]


_FIXED_ARMS = "its arms are fixed"
KINDS = {k.command: k for k in (
    Kind("compare", "compare", "Compare", "baseline against SD-MoE from scratch: the paper's claims, measured", {}),
    Kind("study", "study", "Study", "when does SD-MoE help? one factor at a time, every cell a compare", {}),
    Kind("upcycle-compare", "upcycle", "UpcycleCompare",
         "a dense parent upcycled (copy, Drop-Upcycling), continued with and without SD-MoE",
         {f: _FIXED_ARMS for f in ("styles", "variants", "ablations", "lr_multipliers")}),
    Kind("finetune-compare", "finetune", "FinetuneCompare",
         "an MoE of two domains adapted to the third, with and without SD-MoE",
         {**{f: _FIXED_ARMS for f in ("styles", "variants", "ablations", "lr_multipliers", "init")},
          "text": "its domains are the bundled ones"}),
    Kind("methods-compare", "methods", "MethodsCompare",
         "which specialisation remedy? SD-MoE head to head with Guo et al.'s losses and global-batch balancing, "
         "and combined with them, from scratch and from upcycled starts",
         {**{f: _FIXED_ARMS for f in ("styles", "variants", "ablations", "lr_multipliers", "init")},
          "text": "its cells are the bundled mix and one bundled domain"}),
)}


def _compare(**kw):
    from sdmoe.experiments.grid import CompareConfig

    return CompareConfig(**kw)


def _settings(module: str, cls: str, **kw):
    return getattr(importlib.import_module(f"sdmoe.experiments.{module}"), cls)(**kw)


# The first look (`make demo`): qwen2_moe at d = 64 (about 20 s a run on 2 cores), 3 paired seeds of baseline,
# SD-MoE and the control on the bundled mix, the same-seed rerun and claim (e)'s timing in 4 processes; then
# baseline against SD-MoE on drama alone. At d = 64 the study found the gain absent on the mix (+0.004
# [-0.012, +0.020]) and present on drama alone (+0.141 [+0.034, +0.248]); from d = 96 on it appears on the mix
# (docs/results.md, "When does it help"). 16 runs.
FIRST_LOOK = dict(styles=["qwen2_moe"], variants=["baseline", "sd-moe", "control"], lr_multipliers=[1.0],
                  lr_sweep_styles=0, per_text=True, per_text_domains=["drama"])
PRESETS = {p.name: p for p in (
    Preset("demo", "compare", "the first look, about 5 min on 2 cores: qwen2_moe at d=64, 3 paired seeds of "
           "baseline, SD-MoE and the control on the mix, then on drama alone (16 runs)",
           lambda: _compare(**FIRST_LOOK)),
    Preset("demo-full", "compare", "the full demo grid, about 15-20 min on 2 cores: both styles, the rate check "
           "(0.5x) and 4x, then every domain alone (41 runs)",
           lambda: _compare(lr_multipliers=[0.5, 1.0, 4.0], per_text=True)),
    Preset("lab", "compare", "the lab model, default against the paper's own split, 3 seeds at the baseline's "
           "tuned rate 6e-3, the rate grid and the paper's ablations (27 runs, 2-3 hours on 2 cores)",
           lambda: _compare(preset="small", overrides=["optim.lr=0.006"], styles=["qwen3_moe"], seeds=3,
                            variants=["baseline", "sd-moe", "paper", "control"], lr_multipliers=[0.5, 1.0, 2.0, 4.0],
                            lr_sweep_styles=1, lr_sweep_seeds=1, lr_sweep_variants=["baseline", "sd-moe", "paper"],
                            ablations=["paper-one-sided", "paper-refresh-1", "paper-no-refresh", "paper-rank-d4",
                                       "fixed-gradients"], ablation_seeds=1)),
    Preset("paper", "compare", "the full grid on the lab model: every rate, style and seed, the rank sweep and "
           "the ablations (hours on CPU; ready for a GPU)",
           lambda: _compare(preset="small", styles=["qwen2_moe", "deepseek_v3"], seeds=3,
                            variants=["baseline", "sd-moe", "control"], lr_multipliers=[0.5, 1.0, 2.0, 4.0],
                            lr_sweep_styles=2, lr_sweep_seeds=3, lr_sweep_variants=["baseline", "sd-moe", "control"],
                            rank_sweep=[4, 8, 16, 64],  # d=128: 4..d/2; d/4 = 32 is the sd-moe row itself
                            ablations=["fixed-weights", "reestimate-50", "per-expert", "shared-lr-2", "tracker-2"])),
    Preset("tiny", "compare", "tests: seconds",  # each timing process costs seconds of start-up: tests opt in
           lambda: _compare(preset="tiny", styles=["qwen2_moe"], seeds=2, variants=["baseline", "sd-moe"],
                            lr_multipliers=[1.0], lr_sweep_styles=0, analyze=False, timing_processes=0)),
    Preset("study", "study", "the demo model, 3 paired seeds a cell, about 20 s a run at d=64 on 2 cores "
           "(text: 4 cells, 45 runs; repetition: 10 cells, 70 runs; size: 3 cells, 21 runs, longer at d=96, 128)",
           lambda: _settings("study", "StudyConfig")),
    Preset("study-tiny", "study", "tests: seconds a cell",
           lambda: _settings("study", "StudyConfig", preset="tiny", seeds=2, sizes=[32, 48], width=32, steps=8,
                             overrides=["sdmoe.split_step=2", "loop.eval_every=4", "loop.monitor_every=0"])),
    Preset("upcycle", "upcycle-compare", "a dense qwen3 (d=96) upcycled into 8 experts top-2, 5 arms x 3 seeds "
           "(17 runs, about 6 min on 2 cores)", lambda: _settings("upcycle", "UpcycleConfig")),
    Preset("upcycle-tiny", "upcycle-compare", "tests: seconds",
           lambda: _settings("upcycle", "UpcycleConfig", preset="tiny", hidden_size=32, dense_ffn=32, experts=4,
                             parent_steps=10, steps=8, seeds=2)),
    Preset("finetune", "finetune-compare", "a qwen3_moe (d=96) of drama and encyclopedia adapted to fairy tales, "
           "3 paired seeds (8 runs, about 3 min on 2 cores)", lambda: _settings("finetune", "FinetuneConfig")),
    Preset("methods", "methods-compare", "6 arms (plain, SD-MoE, Guo et al.'s losses, global-batch balancing, "
           "SD-MoE with each) at d=96: each arm's rate from a grid, then 3 paired seeds on the mix, on drama alone, "
           "from copy-upcycled and from BTX experts (108 runs, about 65 min on 2 cores)",
           lambda: _settings("methods", "MethodsConfig")),
    Preset("methods-tiny", "methods-compare", "tests: seconds a run",
           lambda: _settings("methods", "MethodsConfig", preset="tiny", hidden_size=32, steps=8, seeds=2, rates=[1.0],
                             coefficients=[1.0, 10.0], micro_batches=2, parent_steps=8, finetune_steps=4,
                             continue_steps=6, experts=4, cells=["mix", "copy", "btx"],
                             overrides=["loop.eval_every=4", "sdmoe.split_step=2"])),
    Preset("finetune-tiny", "finetune-compare", "tests: seconds",
           lambda: _settings("finetune", "FinetuneConfig", preset="tiny", hidden_size=32, expert_ffn=32, base_steps=10,
                             steps=8, seeds=2)),
)}


def presets_of(command: str) -> list[Preset]:
    return [p for p in PRESETS.values() if p.command == command]


def preset_help(command: str) -> str:
    """The --preset help of a command: each of its presets with what it runs and how long."""
    return " | ".join(f"{p.name} ({p.about})" for p in presets_of(command))


def default_preset(command: str) -> str:
    return {"compare": "demo", "study": "study", "upcycle-compare": "upcycle", "finetune-compare": "finetune",
            "methods-compare": "methods"}[command]


def resolve(command: str, name: str) -> tuple[Preset, Kind]:
    """The preset `name` of `command`, and the command that runs it: its own, or, for the old spelling
    `compare --preset upcycle|finetune[-tiny]`, theirs."""
    p = PRESETS.get(name) if isinstance(name, str) else None
    if p is not None and (p.command == command or (command == "compare" and p.command.endswith("-compare"))):
        return p, KINDS[p.command]
    own = ", ".join(x.name for x in presets_of(command))
    more = ("; upcycle, finetune and methods have their own commands (sdmoe upcycle-compare, sdmoe finetune-compare, "
            "sdmoe methods-compare)") \
        if command == "compare" else ""
    raise UserError(f"unknown {command} preset {name!r}; choose {own}{more}")


def configure(command: str, preset: str, flags: dict[str, Any]):
    """The experiment `sdmoe <command> --preset <preset> <flags>` runs: the preset's settings, then each flag
    given (`flags`: name -> value, the ones not given left out) through its setting's declaration."""
    p, kind = resolve(command, preset)
    module = kind.load()
    refused = [f for f in flags if f not in module.FLAGS]
    if refused:
        why = kind.refused.get(refused[0], f"`sdmoe {kind.command}` takes no such flag")
        names = ", ".join(f"--{f.replace('_', '-')}" for f in refused)
        raise UserError(f"{names} with --preset {preset}: {why}; drop {'them' if len(refused) > 1 else names}")
    cfg = module.apply_flags(p.build(), flags)
    return getattr(module, kind.experiment)(cfg)


def default_out(command: str, preset: str) -> str:
    """runs/study for the study, runs/compare-<preset> for the others (as before they had commands of their own)."""
    if command == "study":
        return "runs/study" if preset == "study" else f"runs/{preset}"
    return f"runs/compare-{preset}"


def rebuild_report(out: str | Path) -> str:
    """`sdmoe report DIR`: the report of whichever experiment DIR holds, from its run files alone."""
    out = Path(out)
    classes = [getattr(kind.load(), kind.experiment) for kind in KINDS.values()]
    for cls in classes:
        if (out / cls.settings_file).is_file():
            return cls.load(out).report(out).text
    files = ", ".join(cls.settings_file for cls in classes)
    raise UserError(f"{out} holds no experiment (none of {files}); point at a directory written by `sdmoe compare`, "
                    "`sdmoe study`, `sdmoe upcycle-compare`, `sdmoe finetune-compare` or `sdmoe methods-compare`")
