"""`sdmoe finetune-compare`: adapting a trained MoE to a new domain, with and without SD-MoE.

    base     an MoE trained from scratch on two domains (drama and encyclopedia by default)
    adapt    from the base's weights and tokenizer, trained on the third domain alone (fairy tales),
             baseline against SD-MoE, paired by seed (the data order)
    measure  after adapting, the validation loss on the new domain and on the old ones (forgetting:
             old-domain loss after minus the base's), each paired gain with its 95% interval

`finetune.md` / `finetune.json` hold the table. Every run resumes; a finished one is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdmoe.config_fields import setting
from sdmoe.errors import UserError
from sdmoe.experiments.arms import Arm, Arms, ArmsExperiment
from sdmoe.experiments.engine import ExperimentResult, PlannedRun, Session, assign_flags, run_config, write_tables
from sdmoe.experiments.judging import interval_figure
from sdmoe.files import read_json_or_none, write_json_atomic

ARMS = Arms((Arm("baseline", {"method": "baseline"}), Arm("sd-moe", {"method": "sd-moe"})), reference="baseline")
METHODS = tuple(ARMS)
FINETUNE_FILE = "finetune_compare.json"  # the compare's settings, written first: a rerun resumes, another is refused


@dataclass
class FinetuneConfig:
    preset: str = setting("demo", label="train preset")
    hidden_size: int = setting(96, ge=8)
    expert_ffn: int = setting(96, ge=1)
    old: list[str] = setting(["drama", "encyclopedia"], min_len=1, unique=True)  # the base's domains
    new: str = "fairy_tales"  # the domain it is adapted to
    base_steps: int = setting(400, ge=1)
    steps: int = setting(200, ge=1)  # adaptation
    seeds: int = setting(3, ge=2)
    lr: float = setting(3e-3, gt=0)
    overrides: list[str] = setting([])


def _run_config(cfg: FinetuneConfig, domains: list[str], steps: int, seed: int, init: str | None, model=None):
    """One run's config (its method set by its arm). `model`: the model section of a start `init` not written
    yet (the base's, for the checks before the first write); without it, `init` is read as `train --init` does."""
    new_model = {"model.style": "qwen3_moe", "model.hidden_size": cfg.hidden_size, "model.expert_ffn": cfg.expert_ffn}
    rc = run_config(cfg.preset, list(cfg.overrides), new_model,
                    {"data.domains": domains, "loop.steps": steps, "loop.seed": seed, "method": "baseline",
                     "optim.lr": cfg.lr, "sdmoe.split_step": 0, "name": f"seed{seed}"}, init, model)
    rc.loop.eval_every = max(1, steps // 8)
    rc.loop.monitor_every = 0
    return rc


class FinetuneCompare(ArmsExperiment):
    command, what, settings_file, settings = "finetune-compare", "finetune compare", FINETUNE_FILE, FinetuneConfig
    arms, stem = ARMS, "finetune"

    def base_run(self) -> PlannedRun:
        cfg = self.config
        return PlannedRun("base", _run_config(cfg, list(cfg.old), cfg.base_steps, 0, None),
                          {"arm": "base", "seed": 0}, dir="base")

    def config_of(self, arm: Arm, seed: int, out: Path, model=None):
        """An adapted run: from the base's weights and tokenizer, on the new domain alone."""
        cfg = self.config
        return _run_config(cfg, [cfg.new], cfg.steps, seed, str(out / "base" / "model"), model)

    def start_models(self, out: Path) -> dict:
        return {None: self.base_run().config.model}

    def extra_runs(self) -> list[PlannedRun]:
        return [self.base_run()]

    def check(self, out: Path) -> None:
        """The settings, and every run's config (the --set values of the base and of every adapted run)."""
        cfg = self.config
        if cfg.new in cfg.old:
            raise UserError(f"the new domain {cfg.new!r} is one of the base's ({', '.join(cfg.old)}); choose another")
        super().check(out)

    def prepare(self, session: Session) -> bool:
        session.say("base: an MoE of the old domains")
        return session.train(self.base_run()) is not None

    def report(self, out: Path) -> ExperimentResult:
        payload = summarize(out, self.config)
        return write_tables(out, "finetune", self.config, payload, render(payload))


def _losses_on_every_domain(model_dir: Path, cfg: FinetuneConfig) -> dict[str, float]:
    """The model's validation loss on the old and the new domains (its own tokenizer), cached beside it."""
    cache = model_dir.parent / "all_domains.json"
    if (done := read_json_or_none(cache)) is not None:
        return done
    from sdmoe.data import prepare_dataset
    from sdmoe.eval.perplexity import evaluate_loss
    from sdmoe.models.pretrained import load_pretrained_model, load_tokenizer
    from sdmoe.train.config import preset, set_value

    rc = preset(cfg.preset)
    set_value(rc, "data.domains", [*cfg.old, cfg.new])
    ds = prepare_dataset(rc.data, seed=0, tokenizer=load_tokenizer(model_dir))
    losses = evaluate_loss(load_pretrained_model(model_dir).eval(), ds.val, "cpu")
    write_json_atomic(cache, losses)
    return losses


def summarize(out: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    before = _losses_on_every_domain(out / "base" / "model", cfg)
    after = {(arm.name, s): _losses_on_every_domain(out / "runs" / run_id / "model", cfg)
             for arm, s, run_id in ARMS.planned(cfg.seeds)}

    def old_loss(d: dict) -> float:
        return sum(d[k] for k in cfg.old) / len(cfg.old)

    rows = []
    for what, value in (("new domain", lambda d: d[cfg.new]), ("old domains", old_loss)):
        figure = {key: value(losses) for key, losses in after.items()}
        judged = {r["arm"]: r for r in ARMS.judge(figure, cfg.seeds)}
        sd = judged["sd-moe"]
        rows.append({"what": what, "before": value(before), "baseline": judged["baseline"]["value"],
                     "sd-moe": sd["value"], "gain": sd["gain"], "gain_figure": sd["gain_figure"],
                     "verdict": sd["verdict"], "reason": sd["reason"], "same_seed_noise": ARMS.same_seed_noise(figure)})
    return {"config": asdict(cfg), "before": before, "rows": rows}


def render(payload: dict) -> str:
    cfg = payload["config"]
    lines = [f"# Fine-tuning: a qwen3_moe (d = {cfg['hidden_size']}) trained on {', '.join(cfg['old'])}, adapted "
             f"to {cfg['new']}",
             "",
             f"Base {cfg['base_steps']} steps; adaptation {cfg['steps']} steps on {cfg['new']} alone from the base's "
             f"weights and tokenizer, {cfg['seeds']} paired seeds (data order). Gain: baseline's validation loss "
             "minus SD-MoE's after adapting (nats; > 0: SD-MoE better), 95% t-interval over seeds.",
             "",
             "| validation loss on | before adapting | baseline after | SD-MoE after | gain of SD-MoE | verdict | "
             "same-seed noise |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        noise = "-" if r["same_seed_noise"] is None else f"{r['same_seed_noise']:.4f}"
        lines.append(f"| {r['what']} | {r['before']:.3f} | {interval_figure(r['baseline'], count=False)} | "
                     f"{interval_figure(r['sd-moe'], count=False)} | {r['gain_figure']} | {r['verdict']} | {noise} |")
    lines += ["", "Forgetting is the old domains' loss after adapting minus before; a gain there is less forgetting."]
    return "\n".join(lines) + "\n"


# -- flags: what `sdmoe finetune-compare` (and the old `compare --preset finetune`) set -------------------

FLAGS = ("seeds", "steps", "overrides")


def apply_flags(cfg: FinetuneConfig, flags: dict[str, Any]) -> FinetuneConfig:
    return assign_flags(cfg, flags, ("seeds", "steps"))
