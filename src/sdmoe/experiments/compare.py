"""`sdmoe compare`: run the matched grid of `grid.plan`, then aggregate and report.

    out/compare.json                 the CompareConfig (a different one on the same out is refused)
    out/runs/<style>/<variant>/lr<m>/seed<s>/   one `train()` run each (run.json, metrics.jsonl, model/)
        compare_run.json             the run's spec, wall time, trainable parameters after the split
        analysis.json                post-hoc analysis of the final model (routing, domain MI)
    out/summary.json, summary.csv, report.html   (`rebuild_report(out)` re-creates them)

The dataset is prepared once and shared by every run; each seed gets its own
data order (the batches are a pure function of (seed, step)). A finished run is
skipped, an interrupted one resumed, a diverged one recorded as such.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdmoe.config_fields import changed_settings
from sdmoe.errors import UserError
from sdmoe.experiments.grid import CompareConfig, RunSpec, plan
from sdmoe.files import (
    DirLock,
    json_safe,
    make_dirs,
    probe_writable,
    read_json_or_none,
    read_json_strict,
    remove_made,
    tmp_file_name,
    write_json_atomic,
)
from sdmoe.train.run_record import read_run_record

COMPARE_FILE = "compare.json"
COMPARE_RUN_FILE = "compare_run.json"  # beside train's own run.json (`sdmoe.train.run_record`)
ANALYSIS_FILE = "analysis.json"


@dataclass
class CompareResult:
    out_dir: Path
    config: CompareConfig
    runs: list[dict[str, Any]]  # run_id, action (trained | resumed | skipped | diverged), wall_s
    summary: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the terminal summary
    report: Path | None = None

    def summary_text(self) -> str:
        return self.text


def claim_out_dir(out: Path, cfg, record: str = COMPARE_FILE, what: str = "compare") -> None:
    """Write out/<record> (the experiment's settings), or check that the one there holds the same settings:
    an --out holds one experiment, and re-running the same one resumes it. Any other non-empty --out is
    refused before anything is written into it."""
    saved_file = out / record
    if saved_file.is_file():
        # A setting saved before it existed counts as its default; one no run depends on may change.
        changed = changed_settings(_saved_config(out, record, what), cfg)
        if any(rule.resume != "any" for _key, rule, _old, _new in changed):
            raise UserError(f"{out} holds a {what} with other settings; use another --out "
                            "(or the same settings to resume it)")
        if changed:
            write_json_atomic(saved_file, {"version": 1, "config": asdict(cfg)})
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not empty and holds no {what}; choose an empty or new --out")
    made: list[Path] = []
    try:
        made = make_dirs(out)
        write_json_atomic(saved_file, {"version": 1, "config": asdict(cfg)})
    except OSError as e:
        remove_made(made)
        raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable --out") from None


def _saved_config(out: Path, record: str = COMPARE_FILE, what: str = "compare") -> dict | None:
    """The config in out/<record>; None when there is none; a UserError when it is corrupt."""
    fix = f"restore it, or start the {what} again in another --out"
    saved = read_json_strict(out / record, fix=fix)
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)):
        raise UserError(f"{out / record} holds no {what} config; {fix}")
    return saved["config"] if saved is not None else None


def load_compare_config(out: str | Path) -> CompareConfig:
    saved = _saved_config(Path(out))
    if saved is None:
        raise UserError(f"{out} holds no {COMPARE_FILE}; point at a directory written by `sdmoe compare`")
    return CompareConfig.from_dict(saved)


def _probes(cfg: CompareConfig, specs: list[RunSpec]) -> list[str]:
    """The longest paths a compare writes below its --out (see `sdmoe.files.probe_writable`):
    the run with the longest id, laid out as `train` lays out a run, and the top-level files."""
    from sdmoe.train.checkpoint import run_dir_probes

    top = [tmp_file_name(n) for n in (COMPARE_FILE, TIMING_FILE, "summary.json", "summary.csv", "report.html")]
    if not specs:
        return top
    spec = max(specs, key=lambda s: len(s.run_id.encode("utf-8", "surrogateescape")))
    run = f"runs/{spec.run_id}"
    return top + [f"{run}/{tmp_file_name(n)}" for n in (COMPARE_RUN_FILE, ANALYSIS_FILE)] + \
        [f"{run}/{p}" for p in run_dir_probes(spec.run_config(cfg).loop.steps)]


def run_state(run_dir: Path) -> str:
    """"done" | "diverged" | "partial" (resumable) | "new"."""
    mine = read_json_or_none(run_dir / COMPARE_RUN_FILE) or {}
    if mine.get("status") == "diverged":
        return "diverged"
    # Strict: a corrupt run.json would otherwise read as "new", and a new run's directory is cleared.
    run = read_run_record(run_dir, strict=True, fix=f"delete {run_dir} to train that run again")
    if run is not None and run.get("status") == "done":
        return "done"
    if run is not None:
        from sdmoe.train.checkpoint import list_checkpoints

        if list_checkpoints(run_dir / "checkpoints"):
            return "partial"
    return "new"


class _Datasets:
    """One prepared dataset per data config; one cheap view per seed (its own data order)."""

    def __init__(self):
        self._base: dict[str, Any] = {}

    def get(self, rc):
        import copy

        from sdmoe.data import prepare_dataset

        key = json.dumps([rc.to_dict()["data"], rc.init], sort_keys=True)
        if key not in self._base:  # from a checkpoint (--init), its own tokenizer tokenises the text
            from sdmoe.models.pretrained import load_tokenizer

            tokenizer = load_tokenizer(rc.init) if rc.init else None
            self._base[key] = prepare_dataset(rc.data, seed=rc.loop.seed, tokenizer=tokenizer)
        base = self._base[key]
        ds = copy.copy(base)
        ds.train = copy.copy(base.train)
        ds.train.load_state_dict({"seed": rc.loop.seed, "step": 0})
        return ds


def trainable_after_split(rc, vocab_size: int) -> int | None:
    """Trainable parameters of the SD-MoE model while it trains (after the split); None if it cannot split here."""
    if rc.method != "sd-moe":
        return None
    try:
        from sdmoe.method import SDMoE
        from sdmoe.models import build_model, count_parameters

        model = build_model(rc.model, vocab_size, seed=rc.loop.seed)
        SDMoE(model, rc.sdmoe).split()
        return int(count_parameters(model))
    except Exception:  # noqa: BLE001 - a basis that needs data (gradients/activations) cannot split cold
        return None


def analyze_run(run_dir: Path, ds, k: int) -> dict | None:
    """Post-hoc analysis of the final model on the validation batches, with domain labels."""
    import torch

    from sdmoe.analysis.run import analyze_model
    from sdmoe.models.generate import load_pretrained

    model, _ = load_pretrained(run_dir / "model")
    batches, domain_ids = [], []
    for i, d in enumerate(ds.domains):
        for b in ds.val[d]:
            batches.append(b)
            domain_ids.append(torch.full((b.shape[0],), i, dtype=torch.long))
    result = analyze_model(model, batches, domain_ids, k=k, domain_names=list(ds.domains), progress=False,
                           name=str(run_dir))
    payload = result.to_dict()
    write_json_atomic(run_dir / ANALYSIS_FILE, payload)
    return payload


def _train_one(spec: RunSpec, cfg: CompareConfig, out: Path, datasets: _Datasets,
               device: str = "auto") -> dict[str, Any]:
    from sdmoe.train.loop import NonFiniteError, train

    run_dir = out / "runs" / spec.run_id
    state = run_state(run_dir)
    rc = spec.run_config(cfg)
    rc.loop.device = device  # where it runs is not part of the grid: a compare may move between machines
    mine = read_json_or_none(run_dir / COMPARE_RUN_FILE) or {}
    record = {"run_id": spec.run_id, "action": "skipped" if state in ("done", "diverged") else state,
              "wall_s": mine.get("wall_s", 0.0)}
    ds = None
    if state in ("new", "partial"):
        if state == "new" and run_dir.exists():
            shutil.rmtree(run_dir)  # started but nothing to resume from: start clean
        ds = datasets.get(rc)
        t0 = time.perf_counter()
        status, error = "done", None
        try:
            train(rc, run_dir, resume=(state == "partial"), progress=False, dataset=ds)
        except NonFiniteError as e:
            status, error = "diverged", str(e)
        wall = mine.get("wall_s", 0.0) + (time.perf_counter() - t0)
        mine = {
            "run_id": spec.run_id, "style": spec.style, "variant": spec.variant, "seed": spec.seed,
            "lr_mult": spec.lr_mult, "overrides": spec.overrides, "status": status, "error": error,
            "wall_s": wall, "resumes": mine.get("resumes", -1) + 1,
            "trainable_parameters_after_split": trainable_after_split(rc, ds.vocab_size),
        }
        write_json_atomic(run_dir / COMPARE_RUN_FILE, mine)
        record.update(action="trained" if state == "new" else "resumed", wall_s=wall)
        if status == "diverged":
            record["action"] = "diverged"
    if cfg.analyze and mine.get("status") == "done" and not (run_dir / ANALYSIS_FILE).is_file():
        ds = ds or datasets.get(rc)
        analyze_run(run_dir, ds, rc.loop.monitor_rank)
    return record


def run_compare(cfg: CompareConfig, out_dir: str | Path, progress: bool = True,
                max_runs: int | None = None, device: str = "auto") -> CompareResult:
    """Run (or resume) every run of `plan(cfg)` into `out_dir`, then write the summary and report.

    `max_runs` stops after that many runs were trained (an interrupted compare, for tests);
    `device`: where the runs train (`loop.device`), not part of the grid's settings. The
    step-time measurement of claim (e) follows `cfg.timing_processes` (0: none, as `sdmoe study` sets).
    """
    from tqdm.auto import tqdm

    from sdmoe.device import resolve_device

    cfg.validate()
    resolve_device(device)  # "cuda" on a machine without one fails before anything is written
    out = Path(out_dir)
    specs = plan(cfg)  # every run's config validated: a bad --set does not wait for its run
    # One compare per --out: a second one would remove the runs the first is training
    # (a "new" run's directory is cleared before it starts). Held until the report is written.
    with DirLock(out, "is being written by another `sdmoe compare`") as lock:
        probe_writable(out, _probes(cfg, specs))  # every path the grid writes, before the first run
        claim_out_dir(out, cfg)
        lock.acquire()  # a new --out exists only now
        datasets = _Datasets()
        records = []
        trained = 0
        bar = tqdm(specs, desc="compare", unit="run", disable=not progress, dynamic_ncols=True)
        for spec in bar:
            if max_runs is not None and trained >= max_runs:
                break
            bar.set_postfix_str(spec.run_id)
            rec = _train_one(spec, cfg, out, datasets, device)
            trained += rec["action"] != "skipped"
            records.append(rec)
        bar.close()
        if max_runs is None:
            _measure_step_times(cfg, specs, out, datasets, progress)
            if cfg.per_text:
                for domain in text_domains(cfg):
                    if progress:
                        print(f"per text: {domain} alone", flush=True)
                    run_compare(per_text_config(cfg, domain), out / TEXTS_DIR / domain, progress, device=device)
        summary, text, report = rebuild_report(out, _return_all=True)
    return CompareResult(out, cfg, records, summary, text, report)


TIMING_FILE = "timing.json"
TEXTS_DIR = "texts"  # the per-text sub-compares: OUT/texts/<domain>/


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
    from sdmoe.experiments import stats
    from sdmoe.experiments.claims import load_run, text_gain_row

    style = cfg.styles[0]
    rows = [text_gain_row("all domains (the mix)", summary["runs"], style)]
    texts = out / TEXTS_DIR
    for sub_dir in sorted(p for p in texts.iterdir() if p.is_dir()) if texts.is_dir() else []:
        sub_cfg = load_compare_config(sub_dir) if (sub_dir / "compare.json").is_file() else None
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


def _measure_step_times(cfg: CompareConfig, specs: list[RunSpec], out: Path, datasets: _Datasets, progress: bool) -> None:
    """Claim (e) from a fair measurement: baseline and SD-MoE interleaved, in fresh processes, per style.

    Run-against-run step times move with the machine's load; these do not (see
    `sdmoe.experiments.timing`). Kept in out/timing.json (measured once; delete the
    file to measure again)."""
    from sdmoe.experiments.timing import measure

    if cfg.timing_processes == 0:
        return
    saved = read_json_or_none(out / TIMING_FILE) or {}
    for style in cfg.styles:
        pair = {s.variant: s for s in specs if s.style == style and s.lr_mult == 1.0 and s.seed == 0
                and s.variant in ("baseline", "sd-moe")}
        if style in saved or len(pair) < 2:
            continue
        configs = {v: pair[v].run_config(cfg) for v in ("baseline", "sd-moe")}
        if progress:
            print(f"timing {style}: baseline and sd-moe steps interleaved, {cfg.timing_rounds} rounds in each of "
                  f"{cfg.timing_processes} fresh processes", flush=True)
        saved[style] = measure(configs, datasets.get(configs["baseline"]), cfg.timing_processes, cfg.timing_rounds)
        write_json_atomic(out / TIMING_FILE, saved)


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
