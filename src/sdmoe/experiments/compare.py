"""`sdmoe compare`: the matched grid of `grid.plan` on the engine, then the claims, the summary and the report.

    out/compare.json                 the CompareConfig (a different one on the same out is refused)
    out/runs/<style>/<variant>/lr<m>/seed<s>/   one `train()` run each (run.json, metrics.jsonl, model/)
        compare_run.json             the run's spec, wall time, trainable parameters after the split
        analysis.json                post-hoc analysis of the final model (routing, domain MI)
    out/timing.json                  claim (e)'s interleaved step times (`timing`)
    out/texts/<domain>/              per_text: baseline against SD-MoE on that domain alone (a compare each)
    out/summary.json, summary.csv, report.html   (`rebuild_report(out)` re-creates them)

The dataset is prepared once and shared by every run; each seed gets its own data order (the batches
are a pure function of (seed, step)). A finished run is skipped, an interrupted one resumed, a diverged
one recorded as such (`engine.train_or_resume`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdmoe.errors import UserError
from sdmoe.experiments import stats
from sdmoe.experiments.engine import (  # noqa: F401 - run_state: where readers of a compare's runs find it
    Experiment,
    ExperimentResult,
    PlannedRun,
    Session,
    assign_flags,
    run_experiment,
    run_probes,
    run_state,
    saved_config,
)
from sdmoe.experiments.grid import CompareConfig, RunSpec, plan
from sdmoe.experiments.timing import TIMING_FILE
from sdmoe.files import json_safe, read_json_or_none, tmp_file_name, write_json_atomic

COMPARE_FILE = "compare.json"
TEXTS_DIR = "texts"  # the per-text sub-compares: OUT/texts/<domain>/
REPORT_FILES = ("summary.json", "summary.csv", "report.html")
CompareResult = ExperimentResult


def planned_run(spec: RunSpec, cfg: CompareConfig) -> PlannedRun:
    """A run of the grid as the engine trains it: its id, its config, its place in the grid."""
    rc = spec.run_config(cfg)
    fields = {"style": spec.style, "variant": spec.variant, "seed": spec.seed, "lr_mult": spec.lr_mult,
              "overrides": spec.overrides}
    return PlannedRun(spec.run_id, rc, fields, rc.loop.monitor_rank if cfg.analyze else None)


class Compare(Experiment):
    command, what, settings_file = "compare", "compare", COMPARE_FILE
    settings = CompareConfig

    def check(self, out: Path) -> None:
        """The settings, and every run's config (`plan` validates each), the per-text sub-compares' too: a bad
        --set does not wait for its run."""
        self.config.validate()
        self.specs = plan(self.config)
        self.texts = per_text_domains(self.config) if self.config.per_text else []
        for domain in self.texts:
            plan(per_text_config(self.config, domain))

    def probes(self, out: Path) -> list[str]:
        top = [tmp_file_name(n) for n in (TIMING_FILE, *REPORT_FILES)]
        return top + run_probes([planned_run(s, self.config) for s in self.specs])

    def execute(self, session: Session) -> None:
        cfg = self.config
        session.train_all([planned_run(s, cfg) for s in self.specs], "compare")
        if session.stopped:
            return
        _measure_step_times(cfg, self.specs, session)
        if cfg.per_text:
            for domain in self.texts:
                session.say(f"per text: {domain} alone")
                run_experiment(Compare(per_text_config(cfg, domain)), session.out / TEXTS_DIR / domain,
                               session.progress, session.device)

    def report(self, out: Path) -> ExperimentResult:
        summary, text, report = rebuild_report(out, _return_all=True)
        return ExperimentResult(out, self.config, text, summary, report)


def run_compare(cfg: CompareConfig, out_dir: str | Path, progress: bool = True,
                max_runs: int | None = None, device: str = "auto") -> ExperimentResult:
    """Run (or resume) every run of `plan(cfg)` into `out_dir`, then write the summary and report.

    `max_runs` stops after that many runs were trained (an interrupted compare, for tests);
    `device`: where the runs train (`loop.device`), not part of the grid's settings. The
    step-time measurement of claim (e) follows `cfg.timing_processes` (0: none, as `sdmoe study` sets).
    """
    return run_experiment(Compare(cfg), out_dir, progress, device, max_runs)


def load_compare_config(out: str | Path) -> CompareConfig:
    saved = saved_config(Path(out), COMPARE_FILE, "compare")
    if saved is None:
        raise UserError(f"{out} holds no {COMPARE_FILE}; point at a directory written by `sdmoe compare`")
    return CompareConfig.from_dict(saved)


# -- the gain per text: a sub-compare per domain ------------------------------------------------------


def text_domains(cfg: CompareConfig) -> list[str]:
    """The domains of the compare's text (the bundled corpora or --text, less any data.domains
    filter), when it has more than one; read, not tokenised."""
    from sdmoe.data.corpus import load_corpus
    from sdmoe.data.dataset import MIN_CORPUS_CHARS, select_domains
    from sdmoe.train.config import apply_overrides, preset

    rc = apply_overrides(preset(cfg.preset), list(cfg.overrides))
    docs = select_domains(load_corpus(list(cfg.text) or None, min_chars=MIN_CORPUS_CHARS), rc.data.domains)
    domains = sorted({d.domain for d in docs})
    return domains if len(domains) > 1 else []


def per_text_domains(cfg: CompareConfig) -> list[str]:
    """The domains that get a sub-compare: `per_text_domains` where it names some (each one the text has),
    else every domain of the text."""
    domains = text_domains(cfg)
    if not cfg.per_text_domains:
        return domains
    unknown = [d for d in cfg.per_text_domains if d not in domains]
    if unknown:
        raise UserError(f"per_text_domains names {', '.join(unknown)}, which the text does not have; "
                        f"its domains are {', '.join(domains) or 'one'}")
    return list(cfg.per_text_domains)


def per_text_config(cfg: CompareConfig, domain: str) -> CompareConfig:
    """The sub-compare on one domain alone: baseline against the default SD-MoE, the first style, the
    same seeds, steps and overrides; no sweeps, ablations, analysis or timing."""
    return CompareConfig(preset=cfg.preset, styles=list(cfg.styles[:1]), seeds=cfg.seeds,
                         variants=["baseline", "sd-moe"], lr_multipliers=[1.0], lr_sweep_styles=0, steps=cfg.steps,
                         overrides=[*cfg.overrides, f"data.domains={json.dumps([domain])}"], text=list(cfg.text),
                         analyze=False, rerun_baseline=False, timing_processes=0)


def per_text_rows(out: Path, cfg: CompareConfig, summary: dict) -> tuple[list[dict], str]:
    """The gain per text (the whole text from this compare, each domain from its sub-compare) and one
    sentence that says where SD-MoE lowered the loss."""
    from sdmoe.experiments.claims import load_run, text_gain_row

    style = cfg.styles[0]
    rows = [text_gain_row("all domains (the mix)", summary["runs"], style)]
    texts = out / TEXTS_DIR
    for sub_dir in sorted(p for p in texts.iterdir() if p.is_dir()) if texts.is_dir() else []:
        sub_cfg = load_compare_config(sub_dir) if (sub_dir / COMPARE_FILE).is_file() else None
        if sub_cfg is None:
            continue
        runs = [load_run(sub_dir / "runs" / spec.run_id, spec) for spec in plan(sub_cfg)]
        rows.append(text_gain_row(sub_dir.name, runs, style))
    said = {v: [r["text"] for r in rows if r["verdict"] == v] for v in stats.VERDICTS}
    parts = []
    if said[stats.REPRODUCED]:
        parts.append("lowered the validation loss on " + ", ".join(
            f"{r['text']} ({r['figure']} nats)" for r in rows if r["verdict"] == stats.REPRODUCED))
    if said[stats.NOT_REPRODUCED]:
        parts.append("raised the validation loss on " + ", ".join(said[stats.NOT_REPRODUCED]))
    if said[stats.INCONCLUSIVE]:
        parts.append("made no difference beyond the seed-to-seed noise on " + ", ".join(said[stats.INCONCLUSIVE]))
    if said[stats.NOT_MEASURABLE]:
        parts.append("has too few finished pairs to say on " + ", ".join(said[stats.NOT_MEASURABLE]))
    return rows, f"SD-MoE {'; '.join(parts)} ({style}, {cfg.seeds} paired seeds, train preset {cfg.preset})."


# -- claim (e): step times measured apart from the runs ---------------------------------------------


def _measure_step_times(cfg: CompareConfig, specs: list[RunSpec], session: Session) -> None:
    """Claim (e) from a fair measurement: baseline and SD-MoE interleaved, in fresh processes, per style.

    Run-against-run step times move with the machine's load; these do not (see
    `sdmoe.experiments.timing`). Kept in out/timing.json (measured once; delete the
    file to measure again)."""
    from sdmoe.experiments.timing import measure

    if cfg.timing_processes == 0:
        return
    out = session.out
    saved = read_json_or_none(out / TIMING_FILE) or {}
    for style in cfg.styles:
        pair = {s.variant: s for s in specs if s.style == style and s.lr_mult == 1.0 and s.seed == 0
                and s.variant in ("baseline", "sd-moe")}
        if style in saved or len(pair) < 2:
            continue
        configs = {v: pair[v].run_config(cfg) for v in ("baseline", "sd-moe")}
        for rc in configs.values():
            rc.loop.device = session.device or rc.loop.device
        session.say(f"timing {style}: baseline and sd-moe steps interleaved, {cfg.timing_rounds} rounds in each of "
                    f"{cfg.timing_processes} fresh processes")
        saved[style] = measure(configs, session.datasets.get(configs["baseline"]), cfg.timing_processes,
                               cfg.timing_rounds)
        write_json_atomic(out / TIMING_FILE, saved)


# -- the report ------------------------------------------------------------------------------------


def rebuild_report(out_dir: str | Path, _return_all: bool = False):
    """Re-create summary.json, summary.csv and report.html from the run files; returns the terminal summary."""
    from sdmoe.experiments.claims import summarize, summary_csv, summary_text
    from sdmoe.files import write_text_atomic
    from sdmoe.report.compare import write_report

    out = Path(out_dir)
    cfg = load_compare_config(out)
    summary = summarize(out, cfg)
    if cfg.per_text:
        summary["per_text"], summary["per_text_sentence"] = per_text_rows(out, cfg, summary)
    summary = json_safe(summary)
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.csv", summary_csv(summary))
    report = write_report(out, summary)
    text = summary_text(summary) + f"\nreport: {report}"
    return (summary, text, report) if _return_all else text


# -- flags: what `sdmoe compare` sets on a preset's CompareConfig ----------------------------------

FLAGS = ("styles", "init", "seeds", "steps", "variants", "ablations", "lr_multipliers", "overrides", "text")


def apply_flags(cfg: CompareConfig, flags: dict[str, Any]) -> CompareConfig:
    """Each flag sets its compare setting through the setting's declaration (type, range, finite numbers);
    --init makes every run start from the checkpoint, after every check `train --init` makes."""
    if flags.get("init"):  # every run starts from the checkpoint: its style is the compare's one style
        from sdmoe.train.config import RunConfig, start_from_checkpoint

        if flags.get("styles"):
            raise UserError("--styles with --init: the style is the checkpoint's; drop --styles")
        start = RunConfig()
        start_from_checkpoint(start, flags["init"])
        cfg.styles, cfg.init = [start.model.style], start.init
    assign_flags(cfg, flags, ("styles", "seeds", "steps", "variants", "ablations", "lr_multipliers", "text"))
    if flags.get("text"):  # the preset's texts alone (the first look's drama) are bundled domains: yours, each one
        cfg.per_text_domains = []
    if flags.get("lr_multipliers") is not None and cfg.lr_sweep_styles == 0:
        cfg.lr_sweep_styles = 1  # rates asked for on a preset that sweeps none (the first look): the first style
    return cfg
