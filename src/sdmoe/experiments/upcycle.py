"""`sdmoe compare --preset upcycle`: does SD-MoE help experts that start identical?

    parent   a dense qwen3 model trained on the text (`sdmoe train` with one expert: the router of
             one expert always weighs it 1, so the model is the dense one; `densify` saves it as such),
             or the user's dense checkpoint (`--init DENSE`: any family `sdmoe upcycle` maps)
    upcycle  copy (identical experts) and drop (Drop-Upcycling), per seed (the routers' initialisation)
    arms     continued for the same tokens from the same weights, paired by seed (routers, data order):
             copy, copy + SD-MoE, drop, drop + SD-MoE, and the dense parent trained on (the anchor
             every upcycling paper reports); the copy baseline's seed 0 twice (the same-seed noise)

The report (`upcycle.md`, `upcycle.json`): each arm's gain over the copy baseline with its 95%
interval and verdict, the steps each arm takes to reach the copy baseline's final loss, the
experts' inter-expert overlap from the start (1.0 for copies) over training, load balance, and the
domain specialisation of the routing. Every run resumes; a finished one is skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdmoe.config_fields import check_tree, setting
from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.claims import ONE_PAIR_FIX, gain_figure, interval_figure, judge, load_run, steps_ratio
from sdmoe.experiments.compare import _Datasets, analyze_run, claim_out_dir, run_state
from sdmoe.files import write_json_atomic, write_text_atomic

# arm -> (upcycling method or None for the dense parent, training method)
ARMS = {"copy": ("copy", "baseline"), "copy+sd-moe": ("copy", "sd-moe"), "drop": ("drop", "baseline"),
        "drop+sd-moe": ("drop", "sd-moe"), "dense": (None, "baseline")}
REFERENCE = "copy"  # every gain is over the copy baseline, the upcycling everyone does
UPCYCLE_FILE = "upcycle_compare.json"  # the compare's settings, written first: a rerun resumes, another is refused


@dataclass
class UpcycleConfig:
    preset: str = setting("demo", label="train preset")  # data, optimiser and loop settings of every run
    hidden_size: int = setting(96, ge=8)  # the width study found the from-scratch gain from d = 96 on
    dense_ffn: int = setting(96, ge=1)  # the parent's FFN width: every upcycled expert's (granularity 1)
    experts: int = setting(8, ge=2)
    top_k: int = setting(2, ge=1)
    parent_steps: int = setting(400, ge=1)
    steps: int = setting(300, ge=1)  # each arm's continued training
    seeds: int = setting(3, ge=2)
    drop_ratio: float = setting(0.5, gt=0, le=1)
    lr: float = setting(3e-3, gt=0)
    text: list[str] = setting([])
    overrides: list[str] = setting([])  # key=value on every run (e.g. loop.threads=2)
    # a dense checkpoint to start from instead of training the parent (`compare --preset upcycle --init DENSE`)
    init: str = ""


def upcycle_preset(name: str) -> UpcycleConfig:
    if name == "upcycle":
        return UpcycleConfig()
    if name == "upcycle-tiny":  # tests: seconds
        return UpcycleConfig(preset="tiny", hidden_size=32, dense_ffn=32, experts=4, parent_steps=10, steps=8,
                             seeds=2)
    raise UserError(f"unknown upcycle preset {name!r}; choose upcycle or upcycle-tiny")


def _run_config(cfg: UpcycleConfig, steps: int, seed: int, method: str, init: str | None, model=None):
    """One run's config. `model`: the model section of a start `init` that is not written yet (the checks
    before the first write); without it, `init` is read as `train --init` reads it."""
    from sdmoe.train.config import apply_overrides, preset, refuse_model_settings, set_value, start_from_checkpoint

    rc = preset(cfg.preset)
    if init and model is not None:
        refuse_model_settings(list(cfg.overrides))
        rc.model, rc.init = model, init
    elif init:
        start_from_checkpoint(rc, init, list(cfg.overrides))
    else:  # the parent: a dense qwen3 as a one-expert MoE
        for key, value in {"model.style": "qwen3_moe", "model.hidden_size": cfg.hidden_size,
                           "model.num_experts": 1, "model.top_k": 1, "model.expert_ffn": cfg.dense_ffn}.items():
            set_value(rc, key, value)
    apply_overrides(rc, list(cfg.overrides))
    for key, value in {"loop.steps": steps, "loop.seed": seed, "method": method, "optim.lr": cfg.lr,
                       "sdmoe.split_step": 0, "name": f"seed{seed}"}.items():
        set_value(rc, key, value)
    rc.loop.monitor_every = max(1, steps // 6)
    rc.loop.eval_every = max(1, steps // 12)
    if cfg.text:
        set_value(rc, "data.text", list(cfg.text))
    return rc


def check_upcycle_compare(cfg: UpcycleConfig, out: Path) -> None:
    """Every check of the compare before its first write: its settings, the user's dense parent (config.json
    against every tensor, every tensor finite, its tokenizer, what upcycle asks of it), every run's config
    (the --set values of every arm), and the output directory."""
    from dataclasses import replace

    from sdmoe.models.upcycle import UpcycleRequest, check_request
    from sdmoe.moe.checkpoint import check_model_dir
    from sdmoe.train.config import validate

    check_tree(cfg, "upcycle")
    if cfg.top_k > cfg.experts:
        raise UserError(f"top_k={cfg.top_k} exceeds experts={cfg.experts}")
    if cfg.init:  # what upcycle and `train --init` would refuse of the parent, named by the user's path
        from sdmoe.models.checks import check_checkpoint, check_tokenizer_fits
        from sdmoe.models.pretrained import load_tokenizer

        family = check_request(check_model_dir(cfg.init), Path(cfg.init),
                               UpcycleRequest(cfg.experts, cfg.top_k, "drop", drop_ratio=cfg.drop_ratio))
        checked = check_checkpoint(cfg.init, read_values=True)
        check_tokenizer_fits(load_tokenizer(cfg.init), checked.embedding_rows, cfg.init)
        parent = _upcycled_model(checked.config, family.moe, 1, 1)
        moe = _upcycled_model(checked.config, family.moe, cfg.experts, cfg.top_k)
    else:
        own = _run_config(cfg, cfg.parent_steps, 0, "baseline", None)
        validate(own)
        parent, moe = own.model, replace(own.model, num_experts=cfg.experts, top_k=cfg.top_k)
    for s in range(cfg.seeds):
        for arm, (method, train_method) in ARMS.items():
            validate(_run_config(cfg, cfg.steps, s, train_method, str(out / "checkpoints" / arm),
                                 moe if method else parent))


def _upcycled_model(config, style: str, experts: int, top_k: int):
    """The model section `train --init` will read from the upcycled checkpoint of the dense `config`."""
    from sdmoe.models.config import ModelConfig

    return ModelConfig(style=style, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                       num_heads=config.num_attention_heads,
                       num_kv_heads=getattr(config, "num_key_value_heads", 0) or 0, num_experts=experts, top_k=top_k,
                       expert_ffn=config.intermediate_size, max_seq_len=config.max_position_embeddings)


def train_if_needed(rc, run_dir: Path, datasets: _Datasets, progress: bool) -> None:
    """Train `rc` into `run_dir` unless it is done; resume it where it stopped."""
    from sdmoe.train.loop import train

    state = run_state(run_dir)
    if state in ("done", "diverged"):
        return
    if state == "new" and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    train(rc, run_dir, resume=state == "partial", progress=progress, dataset=datasets.get(rc))


def run_upcycle_compare(cfg: UpcycleConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train the parent, upcycle it, train every arm and seed, write upcycle.md / upcycle.json."""
    from sdmoe.models.upcycle import densify, upcycle

    out = Path(out)
    check_upcycle_compare(cfg, out)
    claim_out_dir(out, cfg, UPCYCLE_FILE, "upcycle compare")
    datasets = _Datasets()
    if cfg.init:  # the user's dense parent; the dense arm trains on it as a one-expert model of its MoE family
        dense, parent = Path(cfg.init), out / "checkpoints" / "dense-one-expert"
        if not parent.is_dir():
            upcycle(dense, parent, 1, 1, progress=False, min_experts=1)
    else:  # our parent: trained as a one-expert qwen3_moe, saved as the dense qwen3 it computes
        parent = out / "parent" / "model"
        train_if_needed(_run_config(cfg, cfg.parent_steps, 0, "baseline", None), parent.parent, datasets, progress)
        dense = out / "checkpoints" / "dense"
        if not dense.is_dir():
            densify(parent, dense)
    starts = {}
    for s in range(cfg.seeds):
        for method in ("copy", "drop"):
            path = out / "checkpoints" / f"{method}-seed{s}"
            if not path.is_dir():
                upcycle(dense, path, cfg.experts, cfg.top_k, method=method, drop_ratio=cfg.drop_ratio, seed=s,
                        progress=False)
            starts[(method, s)] = path
    runs = []
    for s in range(cfg.seeds):
        for arm, (method, train_method) in ARMS.items():
            init = starts[(method, s)] if method else parent
            runs.append((arm, s, out / "runs" / arm / f"seed{s}", init, train_method))
    runs.append(("copy-rerun", 0, out / "runs" / "copy-rerun" / "seed0", starts[("copy", 0)], "baseline"))
    for i, (arm, s, run_dir, init, method) in enumerate(runs):
        if progress:
            print(f"[{i + 1}/{len(runs)}] {arm} seed {s}", flush=True)
        rc = _run_config(cfg, cfg.steps, s, method, str(init))
        train_if_needed(rc, run_dir, datasets, progress)
        if arm != "dense" and not (run_dir / "analysis.json").is_file():
            analyze_run(run_dir, datasets.get(rc), k=4)
    payload = summarize(out, cfg, starts)
    write_json_atomic(out / "upcycle.json", payload)
    write_text_atomic(out / "upcycle.md", render(payload))
    return payload


def _start_overlap(path: Path) -> float:
    """The upcycled experts' mean inter-expert overlap before any training (1.0 for copies)."""
    from sdmoe.moe.checkpoint import ExpertCheckpoint
    from sdmoe.spectral import mean_expert_overlap

    with ExpertCheckpoint(path) as ckpt:
        vals = [mean_expert_overlap(w.float(), 4) for lw in ckpt.iter_layers() for w in lw.projections().values()]
    return sum(vals) / len(vals)


def _imbalance(run_dir: Path) -> float | None:
    """The last logged window's load: the busiest expert's share times E, mean over layers (1 = balanced)."""
    from sdmoe.files import read_jsonl_lenient

    logs = [r for r in read_jsonl_lenient(run_dir / "metrics.jsonl") if "load" in r and "event" not in r]
    if not logs:
        return None
    load = logs[-1]["load"]
    return sum(max(row) * len(row) for row in load) / len(load)


def summarize(out: Path, cfg: UpcycleConfig, starts: dict) -> dict[str, Any]:
    recs = {(arm, s): load_run(out / "runs" / arm / f"seed{s}") for arm in ARMS for s in range(cfg.seeds)}
    rerun = load_run(out / "runs" / "copy-rerun" / "seed0")
    ref = {s: recs[(REFERENCE, s)] for s in range(cfg.seeds)}
    same_seed = abs(rerun["final_mean"] - ref[0]["final_mean"]) if math.isfinite(rerun["final_mean"]) else None
    rows = []
    for arm in ARMS:
        gains = {s: ref[s]["final_mean"] - recs[(arm, s)]["final_mean"] for s in range(cfg.seeds)
                 if math.isfinite(ref[s]["final_mean"]) and math.isfinite(recs[(arm, s)]["final_mean"])}
        iv, verdict, why = judge(gains, 0.0, +1, "no finished pair", ONE_PAIR_FIX)
        ratios = {}
        for s in range(cfg.seeds):
            r, _ = steps_ratio(recs[(arm, s)], ref[s])
            ratios[s] = 1.0 if r is None else r
        method = ARMS[arm][0]
        overlap_start = [_start_overlap(starts[(method, s)]) for s in range(cfg.seeds)] if method else []
        mon = [recs[(arm, s)]["monitor"] for s in range(cfg.seeds)]
        overlap = {"start": stats.t_interval(overlap_start).mean if overlap_start else None,
                   "steps": mon[0]["step"],
                   "mean": [stats.t_interval([m["param_overlap"][i] for m in mon if i < len(m["param_overlap"])]).mean
                            for i in range(len(mon[0]["param_overlap"]))]}
        spec = [recs[(arm, s)]["specialisation"] for s in range(cfg.seeds)]
        mi = [sp.get("domain_mi_normalized") if isinstance(sp, dict) else None for sp in spec]
        imb = [_imbalance(out / "runs" / arm / f"seed{s}") for s in range(cfg.seeds)]
        rows.append({"arm": arm, "final": stats.t_interval([recs[(arm, s)]["final_mean"] for s in range(cfg.seeds)])
                     .to_dict(), "gain": iv, "verdict": verdict, "reason": why, "gain_figure": gain_figure(iv),
                     "per_seed": gains, "steps_to_copy": stats.t_interval(list(ratios.values())).to_dict(),
                     "overlap": overlap, "mi": stats.t_interval(mi).to_dict(),
                     "imbalance": stats.t_interval(imb).to_dict()})
    # SD-MoE's own gain on each start: the arm with SD-MoE against the same start without it, paired by seed
    own = []
    for start in ("copy", "drop"):
        gains = {s: recs[(start, s)]["final_mean"] - recs[(f"{start}+sd-moe", s)]["final_mean"]
                 for s in range(cfg.seeds)}
        gains = {s: g for s, g in gains.items() if math.isfinite(g)}
        iv, verdict, why = judge(gains, 0.0, +1, "no finished pair", ONE_PAIR_FIX)
        own.append({"start": start, "gain": iv, "gain_figure": gain_figure(iv), "verdict": verdict, "reason": why,
                    "per_seed": gains})
    return {"config": asdict(cfg), "same_seed_noise": same_seed, "rows": rows, "reference": REFERENCE,
            "sdmoe_on_each_start": own}


def _num(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render(payload: dict) -> str:
    cfg = payload["config"]
    parent = (f"the dense checkpoint {cfg['init']}" if cfg.get("init") else
              f"a dense qwen3 (d = {cfg['hidden_size']}, FFN {cfg['dense_ffn']})")
    trained = "" if cfg.get("init") else f"Parent {cfg['parent_steps']} steps, "
    lines = [f"# Upcycling: {parent} into {cfg['experts']} experts, top-{cfg['top_k']}",
             "",
             f"{trained}every arm {cfg['steps']} steps from the same weights, "
             f"{cfg['seeds']} paired seeds (routers, data order). Gains are the copy baseline's final validation "
             "loss minus the arm's (nats; > 0: the arm is better), 95% t-interval over seeds; same-seed noise "
             f"(the copy baseline's seed 0 twice): {_num(payload['same_seed_noise'], '.4f')} nats.",
             "",
             "| arm | final loss | gain over copy | verdict | steps to copy's final loss / its steps | experts' "
             "overlap: start -> end | load imbalance (max share x E) | I(expert; domain) |",
             "|---|---|---|---|---|---|---|---|"]
    words = {stats.REPRODUCED: "better than copy", stats.NOT_REPRODUCED: "worse than copy"}
    for r in payload["rows"]:
        ov = r["overlap"]
        end = ov["mean"][-1] if ov["mean"] else None
        lines.append(f"| {r['arm']} | {interval_figure(r['final'], count=False)} | "
                     f"{r['gain_figure'] if r['arm'] != payload['reference'] else '(reference)'} | "
                     f"{words.get(r['verdict'], r['verdict']) if r['arm'] != payload['reference'] else '-'} | "
                     f"{interval_figure(r['steps_to_copy'], '.2f', count=False)} | {_num(ov['start'])} -> {_num(end)} | "
                     f"{interval_figure(r['imbalance'], '.2f', count=False)} | "
                     f"{interval_figure(r['mi'], '.3f', count=False)} |")
    lines += ["", "SD-MoE's own gain on each start (the start's baseline minus the same start with SD-MoE, paired):", "",
              "| start | gain of SD-MoE | verdict |", "|---|---|---|"]
    lines += [f"| {o['start']} | {o['gain_figure']} | {o['verdict']} |" for o in payload["sdmoe_on_each_start"]]
    lines += ["", "Overlap: mean off-diagonal top-4 subspace overlap of the experts' weights (1.0: identical "
              "experts; the dense arm has one expert and none). Steps: the first evaluation at which the arm's "
              "validation loss reaches the copy baseline's final one (1.0 = not before the end)."]
    return "\n".join(lines) + "\n"

