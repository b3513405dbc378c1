"""`sdmoe upcycle-compare`: does SD-MoE help experts that start identical?

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

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sdmoe.config_fields import setting
from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.arms import Arm, Arms, ArmsExperiment
from sdmoe.experiments.engine import ExperimentResult, PlannedRun, Session, assign_flags, run_config, write_tables
from sdmoe.experiments.judging import fmt_value, gain_row, interval_figure
from sdmoe.experiments.runs import load_imbalance, load_run, steps_ratio

ARMS = Arms((Arm("copy", {"method": "baseline"}, start="copy"),
             Arm("copy+sd-moe", {"method": "sd-moe"}, start="copy"),
             Arm("drop", {"method": "baseline"}, start="drop"),
             Arm("drop+sd-moe", {"method": "sd-moe"}, start="drop"),
             Arm("dense", {"method": "baseline"}, start="dense")),  # the dense parent, trained on
            reference="copy")  # every gain is over the copy baseline, the upcycling everyone does
UPCYCLE_FILE = "upcycle_compare.json"  # the compare's settings, written first: a rerun resumes, another is refused
ANALYSIS_RANK = 4


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
    # a dense checkpoint to start from instead of training the parent (`upcycle-compare --init DENSE`)
    init: str = ""


def _run_config(cfg: UpcycleConfig, steps: int, seed: int, init: str | None, model=None):
    """One run's config (its method set by its arm). `model`: the model section of a start `init` that is not
    written yet (the checks before the first write); without it, `init` is read as `train --init` reads it."""
    parent = {"model.style": "qwen3_moe", "model.hidden_size": cfg.hidden_size,  # a dense qwen3: one expert
              "model.num_experts": 1, "model.top_k": 1, "model.expert_ffn": cfg.dense_ffn}
    run = {"loop.steps": steps, "loop.seed": seed, "method": "baseline", "optim.lr": cfg.lr, "sdmoe.split_step": 0,
           "name": f"seed{seed}", **({"data.text": list(cfg.text)} if cfg.text else {})}
    rc = run_config(cfg.preset, list(cfg.overrides), parent, run, init, model)
    rc.loop.monitor_every = max(1, steps // 6)
    rc.loop.eval_every = max(1, steps // 12)
    return rc


def _upcycled_model(config, style: str, experts: int, top_k: int):
    """The model section `train --init` will read from the upcycled checkpoint of the dense `config`."""
    from sdmoe.models.config import ModelConfig

    return ModelConfig(style=style, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                       num_heads=config.num_attention_heads,
                       num_kv_heads=getattr(config, "num_key_value_heads", 0) or 0, num_experts=experts, top_k=top_k,
                       expert_ffn=config.intermediate_size, max_seq_len=config.max_position_embeddings)


def _start(out: Path, arm: Arm, seed: int, cfg: UpcycleConfig) -> Path:
    """The checkpoint an arm's run of `seed` continues from."""
    if arm.start == "dense":  # the dense arm trains on as a one-expert model: the parent's own, or the user's
        return out / "checkpoints" / "dense-one-expert" if cfg.init else out / "parent" / "model"
    return out / "checkpoints" / f"{arm.start}-seed{seed}"


class UpcycleCompare(ArmsExperiment):
    command, what, settings_file, settings = "upcycle-compare", "upcycle compare", UPCYCLE_FILE, UpcycleConfig
    arms, stem = ARMS, "upcycle"

    def start_models(self, out: Path) -> dict:
        """The model sections of the starts before they exist: the user's parent checked as upcycle and
        `train --init` check it (config.json against every tensor, every tensor finite, its tokenizer, what
        upcycle asks of it), named by the user's path."""
        cfg = self.config
        if not cfg.init:
            own = self.parent_run().config
            moe = replace(own.model, num_experts=cfg.experts, top_k=cfg.top_k)
            return {"dense": own.model, "copy": moe, "drop": moe}
        from sdmoe.models.checks import check_checkpoint, check_tokenizer_fits
        from sdmoe.models.pretrained import load_tokenizer
        from sdmoe.models.upcycle import UpcycleRequest, check_request
        from sdmoe.moe.checkpoint import check_model_dir

        family = check_request(check_model_dir(cfg.init), Path(cfg.init),
                               UpcycleRequest(cfg.experts, cfg.top_k, "drop", drop_ratio=cfg.drop_ratio))
        checked = check_checkpoint(cfg.init, read_values=True)
        check_tokenizer_fits(load_tokenizer(cfg.init), checked.embedding_rows, cfg.init)
        moe = _upcycled_model(checked.config, family.moe, cfg.experts, cfg.top_k)
        return {"dense": _upcycled_model(checked.config, family.moe, 1, 1), "copy": moe, "drop": moe}

    def parent_run(self) -> PlannedRun:
        cfg = self.config
        return PlannedRun("parent", _run_config(cfg, cfg.parent_steps, 0, None), {"arm": "parent", "seed": 0},
                          dir="parent")

    def extra_runs(self) -> list[PlannedRun]:
        return [] if self.config.init else [self.parent_run()]

    def config_of(self, arm: Arm, seed: int, out: Path, model=None):
        return _run_config(self.config, self.config.steps, seed, str(_start(out, arm, seed, self.config)), model)

    def analysis_rank_of(self, arm: Arm) -> int | None:
        return None if arm.start == "dense" else ANALYSIS_RANK  # the dense arm has one expert: nothing to route

    def check(self, out: Path) -> None:
        cfg = self.config
        if cfg.top_k > cfg.experts:
            raise UserError(f"top_k={cfg.top_k} exceeds experts={cfg.experts}")
        super().check(out)

    def prepare(self, session: Session) -> bool:
        """The parent (trained, or the user's), its one-expert form for the dense arm, and per seed its copy and
        Drop-Upcycling starts."""
        from sdmoe.models.upcycle import densify, upcycle

        cfg, out = self.config, session.out
        if cfg.init:  # the user's dense parent; the dense arm trains on it as a one-expert model of its family
            dense = Path(cfg.init)
            session.checkpoint(_start(out, ARMS["dense"], 0, cfg),
                               lambda p: upcycle(dense, p, 1, 1, progress=False, min_experts=1))
        else:  # our parent: trained as a one-expert qwen3_moe, saved as the dense qwen3 it computes
            parent = self.parent_run()
            session.say("parent: a dense qwen3 as a one-expert MoE")
            if session.train(parent) is None:
                return False
            dense = session.checkpoint(out / "checkpoints" / "dense", lambda p: densify(out / parent.dir / "model", p))
        for s in range(cfg.seeds):
            for method in ("copy", "drop"):
                session.checkpoint(out / "checkpoints" / f"{method}-seed{s}",
                                   lambda p, m=method, s=s: upcycle(dense, p, cfg.experts, cfg.top_k, method=m,
                                                                    drop_ratio=cfg.drop_ratio, seed=s, progress=False))
        return True

    def report(self, out: Path) -> ExperimentResult:
        payload = summarize(out, self.config)
        return write_tables(out, "upcycle", self.config, payload, render(payload))


def _start_overlap(path: Path) -> float:
    """The upcycled experts' mean inter-expert overlap before any training (1.0 for copies)."""
    from sdmoe.moe.checkpoint import ExpertCheckpoint
    from sdmoe.spectral import mean_expert_overlap

    with ExpertCheckpoint(path) as ckpt:
        vals = [mean_expert_overlap(w.float(), 4) for lw in ckpt.iter_layers() for w in lw.projections().values()]
    return sum(vals) / len(vals)


def _arm_figures(out: Path, cfg: UpcycleConfig, arm: str, recs: dict, ref: dict) -> dict[str, Any]:
    """What the table shows of one arm beside its gain: steps to the copy baseline's loss, overlap, load, MI."""
    seeds = range(cfg.seeds)
    ratios = {}
    for s in seeds:
        r, _ = steps_ratio(recs[(arm, s)], ref[s])
        ratios[s] = 1.0 if r is None else r
    start = ARMS[arm].start
    overlap_start = [_start_overlap(out / "checkpoints" / f"{start}-seed{s}") for s in seeds] \
        if start != "dense" and all((out / "checkpoints" / f"{start}-seed{s}").is_dir() for s in seeds) else []
    mon = [recs[(arm, s)]["monitor"] for s in seeds]
    overlap = {"start": stats.t_interval(overlap_start).mean if overlap_start else None, "steps": mon[0]["step"],
               "mean": [stats.t_interval([m["param_overlap"][i] for m in mon if i < len(m["param_overlap"])]).mean
                        for i in range(len(mon[0]["param_overlap"]))]}
    spec = [recs[(arm, s)]["specialisation"] for s in seeds]
    mi = [sp.get("domain_mi_normalized") if isinstance(sp, dict) else None for sp in spec]
    imb = [load_imbalance(out / "runs" / arm / f"seed{s}") for s in seeds]
    return {"steps_to_copy": stats.t_interval(list(ratios.values())).to_dict(), "overlap": overlap,
            "mi": stats.t_interval(mi).to_dict(), "imbalance": stats.t_interval(imb).to_dict()}


def summarize(out: Path, cfg: UpcycleConfig) -> dict[str, Any]:
    seeds = cfg.seeds
    recs = {(arm, s): load_run(out / "runs" / arm / f"seed{s}") for arm in ARMS for s in range(seeds)}
    recs[(ARMS.rerun, 0)] = load_run(out / "runs" / ARMS.rerun / "seed0")
    loss = {key: r["final_mean"] for key, r in recs.items()}
    ref = {s: recs[(ARMS.reference, s)] for s in range(seeds)}
    rows = []
    for row in ARMS.judge(loss, seeds):
        gain = row.get("gain", stats.t_interval([]).to_dict())
        rows.append({"arm": row["arm"], "final": row["value"], "gain": gain, "verdict": row.get("verdict"),
                     "reason": row.get("reason", ""), "gain_figure": row.get("gain_figure", "-"),
                     "per_seed": row.get("per_seed", {}), **_arm_figures(out, cfg, row["arm"], recs, ref)})
    # SD-MoE's own gain on each start: the arm with SD-MoE against the same start without it, paired by seed
    own = [{"start": start, **gain_row(ARMS.paired(loss, f"{start}+sd-moe", seeds, against=start))}
           for start in ("copy", "drop")]
    return {"config": asdict(cfg), "same_seed_noise": ARMS.same_seed_noise(loss), "rows": rows,
            "reference": ARMS.reference, "sdmoe_on_each_start": own}


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
             f"(the copy baseline's seed 0 twice): {fmt_value(payload['same_seed_noise'], '.4f')} nats.",
             "",
             "| arm | final loss | gain over copy | verdict | steps to copy's final loss / its steps | experts' "
             "overlap: start -> end | load imbalance (max share x E) | I(expert; domain) |",
             "|---|---|---|---|---|---|---|---|"]
    words = {stats.REPRODUCED: "better than copy", stats.NOT_REPRODUCED: "worse than copy"}
    for r in payload["rows"]:
        ov, ref = r["overlap"], r["arm"] == payload["reference"]
        end = ov["mean"][-1] if ov["mean"] else None
        lines.append(f"| {r['arm']} | {interval_figure(r['final'], count=False)} | "
                     f"{'(reference)' if ref else r['gain_figure']} | "
                     f"{'-' if ref else words.get(r['verdict'], r['verdict'])} | "
                     f"{interval_figure(r['steps_to_copy'], '.2f', count=False)} | "
                     f"{fmt_value(ov['start'])} -> {fmt_value(end)} | "
                     f"{interval_figure(r['imbalance'], '.2f', count=False)} | "
                     f"{interval_figure(r['mi'], '.3f', count=False)} |")
    lines += ["", "SD-MoE's own gain on each start (the start's baseline minus the same start with SD-MoE, paired):", "",
              "| start | gain of SD-MoE | verdict |", "|---|---|---|"]
    lines += [f"| {o['start']} | {o['gain_figure']} | {o['verdict']} |" for o in payload["sdmoe_on_each_start"]]
    lines += ["", "Overlap: mean off-diagonal top-4 subspace overlap of the experts' weights (1.0: identical "
              "experts; the dense arm has one expert and none). Steps: the first evaluation at which the arm's "
              "validation loss reaches the copy baseline's final one (1.0 = not before the end)."]
    return "\n".join(lines) + "\n"


# -- flags: what `sdmoe upcycle-compare` (and the old `compare --preset upcycle`) set ---------------------

FLAGS = ("seeds", "steps", "text", "overrides", "init")


def apply_flags(cfg: UpcycleConfig, flags: dict[str, Any]) -> UpcycleConfig:
    """Each flag through its setting's declaration; --init checked as a checkpoint directory and kept as an
    absolute path (the runs find it from any working directory)."""
    assign_flags(cfg, flags, ("seeds", "steps", "text"))
    if flags.get("init"):  # the dense parent to upcycle, instead of training one
        from sdmoe.moe.checkpoint import check_model_dir

        check_model_dir(flags["init"])
        cfg.init = str(Path(flags["init"]).expanduser().resolve())
    return cfg
