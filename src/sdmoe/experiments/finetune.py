"""`sdmoe compare --preset finetune`: adapting a trained MoE to a new domain, with and without SD-MoE.

    base     an MoE trained from scratch on two domains (drama and encyclopedia by default)
    adapt    from the base's weights and tokenizer, trained on the third domain alone (fairy tales),
             baseline against SD-MoE, paired by seed (the data order)
    measure  after adapting, the validation loss on the new domain and on the old ones (forgetting:
             old-domain loss after minus the base's), each paired gain with its 95% interval

`finetune.md` / `finetune.json` hold the table. Every run resumes; a finished one is skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdmoe.config_fields import check_tree, setting
from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.claims import ONE_PAIR_FIX, gain_figure, interval_figure, judge
from sdmoe.experiments.compare import _Datasets, claim_out_dir
from sdmoe.experiments.upcycle import train_if_needed
from sdmoe.files import read_json_or_none, write_json_atomic, write_text_atomic

METHODS = ("baseline", "sd-moe")
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


def finetune_preset(name: str) -> FinetuneConfig:
    if name == "finetune":
        return FinetuneConfig()
    if name == "finetune-tiny":
        return FinetuneConfig(preset="tiny", hidden_size=32, expert_ffn=32, base_steps=10, steps=8, seeds=2)
    raise UserError(f"unknown fine-tuning preset {name!r}; choose finetune or finetune-tiny")


def _run_config(cfg: FinetuneConfig, domains: list[str], steps: int, seed: int, method: str, init: str | None,
                model=None):
    """One run's config. `model`: the model section of a start `init` not written yet (the base's, for the
    checks before the first write); without it, `init` is read as `train --init` reads it."""
    from sdmoe.train.config import apply_overrides, preset, refuse_model_settings, set_value, start_from_checkpoint

    rc = preset(cfg.preset)
    if init and model is not None:
        refuse_model_settings(list(cfg.overrides))
        rc.model, rc.init = model, init
    elif init:
        start_from_checkpoint(rc, init, list(cfg.overrides))
    else:
        set_value(rc, "model.style", "qwen3_moe")
        set_value(rc, "model.hidden_size", cfg.hidden_size)
        set_value(rc, "model.expert_ffn", cfg.expert_ffn)
    apply_overrides(rc, list(cfg.overrides))
    for key, value in {"data.domains": domains, "loop.steps": steps, "loop.seed": seed, "method": method,
                       "optim.lr": cfg.lr, "sdmoe.split_step": 0, "name": f"seed{seed}"}.items():
        set_value(rc, key, value)
    rc.loop.eval_every = max(1, steps // 8)
    rc.loop.monitor_every = 0
    return rc


def check_finetune_compare(cfg: FinetuneConfig, out: Path) -> None:
    """Every check before the first write: the settings, and every run's config (the --set values of the
    base and of every adapted run)."""
    from sdmoe.train.config import validate

    check_tree(cfg, "finetune")
    if cfg.new in cfg.old:
        raise UserError(f"the new domain {cfg.new!r} is one of the base's ({', '.join(cfg.old)}); choose another")
    base = _run_config(cfg, list(cfg.old), cfg.base_steps, 0, "baseline", None)
    validate(base)
    for method in METHODS:
        validate(_run_config(cfg, [cfg.new], cfg.steps, 0, method, str(out / "base" / "model"), base.model))


def run_finetune_compare(cfg: FinetuneConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    check_finetune_compare(cfg, out)
    claim_out_dir(out, cfg, FINETUNE_FILE, "finetune compare")
    datasets = _Datasets()
    base = out / "base"
    train_if_needed(_run_config(cfg, list(cfg.old), cfg.base_steps, 0, "baseline", None), base, datasets, progress)
    runs = [(m, s) for s in range(cfg.seeds) for m in METHODS] + [("baseline-rerun", 0)]
    for i, (method, s) in enumerate(runs):
        if progress:
            print(f"[{i + 1}/{len(runs)}] {method} seed {s}", flush=True)
        rc = _run_config(cfg, [cfg.new], cfg.steps, s, method.removesuffix("-rerun"), str(base / "model"))
        train_if_needed(rc, out / "runs" / method / f"seed{s}", datasets, progress)
    payload = summarize(out, cfg)
    write_json_atomic(out / "finetune.json", payload)
    write_text_atomic(out / "finetune.md", render(payload))
    return payload


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
    after = {(m, s): _losses_on_every_domain(out / "runs" / m / f"seed{s}" / "model", cfg)
             for m in (*METHODS, "baseline-rerun") for s in (range(cfg.seeds) if m in METHODS else [0])}

    def old_loss(d: dict) -> float:
        return sum(d[k] for k in cfg.old) / len(cfg.old)

    rows = []
    for what, value in (("new domain", lambda d: d[cfg.new]), ("old domains", old_loss)):
        gains = {s: value(after[("baseline", s)]) - value(after[("sd-moe", s)]) for s in range(cfg.seeds)}
        gains = {s: g for s, g in gains.items() if math.isfinite(g)}
        iv, verdict, why = judge(gains, 0.0, +1, "no finished pair", ONE_PAIR_FIX)
        rows.append({"what": what, "before": value(before),
                     "baseline": stats.t_interval([value(after[("baseline", s)]) for s in range(cfg.seeds)]).to_dict(),
                     "sd-moe": stats.t_interval([value(after[("sd-moe", s)]) for s in range(cfg.seeds)]).to_dict(),
                     "gain": iv, "gain_figure": gain_figure(iv), "verdict": verdict, "reason": why,
                     "same_seed_noise": abs(value(after[("baseline-rerun", 0)]) - value(after[("baseline", 0)]))})
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
        lines.append(f"| {r['what']} | {r['before']:.3f} | {interval_figure(r['baseline'], count=False)} | "
                     f"{interval_figure(r['sd-moe'], count=False)} | {r['gain_figure']} | {r['verdict']} | "
                     f"{r['same_seed_noise']:.4f} |")
    lines += ["", "Forgetting is the old domains' loss after adapting minus before; a gain there is less forgetting."]
    return "\n".join(lines) + "\n"
