"""Train every SD-MoE variant 20 steps with whichever sdmoe is first on sys.path; write losses.json.

How docs/method.md's equivalence table was measured (the 0.1 engine from a worktree of e41dc5e):

    git worktree add /tmp/old_engine e41dc5e
    PYTHONPATH=/tmp/old_engine/src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_equivalence/run.py /tmp/eq/old demo,small
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_equivalence/run.py /tmp/eq/new demo,small
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_equivalence/compare.py /tmp/eq/old /tmp/eq/new
"""
import json
import shutil
import sys
import time
from pathlib import Path

from sdmoe.train.config import apply_overrides, preset
from sdmoe.train.loop import train

VARIANTS = {
    "baseline": [],
    "default": ["method=sd-moe"],
    "fixed": ["method=sd-moe", "sdmoe.gradient_split=fixed"],
    "control": ["method=sd-moe", "sdmoe.gradient_split=none"],
    "lowrank-fixed": ["method=sd-moe", "sdmoe.shared_form=lowrank", "sdmoe.gradient_split=fixed"],
    "lowrank-none": ["method=sd-moe", "sdmoe.shared_form=lowrank", "sdmoe.gradient_split=none"],
    "per-expert-fixed": ["method=sd-moe", "sdmoe.mode=per_expert", "sdmoe.gradient_split=fixed"],
    "per-expert-step": ["method=sd-moe", "sdmoe.mode=per_expert"],
    "per-expert-none": ["method=sd-moe", "sdmoe.mode=per_expert", "sdmoe.gradient_split=none"],
    "shared-mult": ["method=sd-moe", "sdmoe.lr_shared_mult=2.0"],
    "exact-oversample": ["method=sd-moe", "sdmoe.exact_every=3", "sdmoe.tracker_oversample=4", "sdmoe.tracker_iters=2"],
    "basis-gradients-fixed": ["method=sd-moe", "sdmoe.basis_source=gradients", "sdmoe.gradient_split=fixed"],
    "basis-activations-reest": ["method=sd-moe", "sdmoe.basis_source=activations", "sdmoe.gradient_split=fixed", "sdmoe.reestimate_every=6"],
    "reest-weights": ["method=sd-moe", "sdmoe.reestimate_every=5"],
    "shared-mult-fixed": ["method=sd-moe", "sdmoe.lr_shared_mult=2.0", "sdmoe.gradient_split=fixed"],
    "gate-only-fixed": ["method=sd-moe", 'sdmoe.projections=["gate"]', "sdmoe.gradient_split=fixed"],
    "gate-only": ["method=sd-moe", 'sdmoe.projections=["gate"]'],
    "down-up": ["method=sd-moe", 'sdmoe.projections=["up","down"]', "sdmoe.gradient_split=fixed"],
}

def _keys(override: str) -> str:
    """The variants are written in 0.1's keys (sdmoe.mode, sdmoe.shared_form); 0.2 has one sdmoe.form."""
    from sdmoe.method import SDMoEConfig

    if not hasattr(SDMoEConfig(), "form"):
        return override
    if override in ("sdmoe.mode=per_expert", "sdmoe.shared_form=lowrank"):
        return "sdmoe.form=" + override.split("=")[1]
    return override


def main(out_root, presets, names):
    out_root = Path(out_root)
    res = {}
    for pname in presets:
        for name in names:
            cfg = preset(pname)
            ov = [_keys(o) for o in VARIANTS[name] if not o.startswith("method=")]
            apply_overrides(cfg, ["loop.steps=20", "loop.log_every=1", "loop.eval_every=1000", "loop.monitor_every=0",
                                  "loop.checkpoint_every=1000", "loop.threads=1", "sdmoe.split_step=5"] + ov)
            if "method=sd-moe" in VARIANTS[name]:
                cfg.method = "sd-moe"
            out = out_root / pname / name
            shutil.rmtree(out, ignore_errors=True)
            t = time.time()
            train(cfg, out, progress=False)
            losses = [rec["loss"] for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                      if "loss" in rec and "event" not in rec]
            res[f"{pname}/{name}"] = losses
            print(pname, name, f"{time.time()-t:.1f}s", losses[-1], flush=True)
    (out_root / "losses.json").write_text(json.dumps(res))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS))
