"""The experiment engine: one way to check, claim, train, resume and report, for every experiment.

An experiment (`Experiment`: compare, study, upcycle-compare, finetune-compare, and any arms
experiment) declares its settings, its runs (`PlannedRun`: a directory below --out and a
`RunConfig`) and the checkpoints they start from; `run_experiment` does the rest, in one order:

    1. check     every setting, every run's config (`train.config.validate`), every checkpoint a run
                 starts from, the device: nothing is written, so a refusal leaves the disk as it was
    2. claim     --out locked, every path it will write probed, its settings file written (or the one
                 there compared: an --out holds one experiment, the same command resumes it, another
                 is refused)
    3. execute   train-or-resume each run (`Session.train`): a finished run is skipped, an interrupted
                 one resumed from its last checkpoint, a diverged one recorded as such; checkpoints
                 made once (`Session.checkpoint`)
    4. report    from the run files alone, so `sdmoe report DIR` rebuilds it

    out/<settings file>                     the experiment's settings (compare.json, ...)
    out/<run dir>/                          one `train()` run each (run.json, metrics.jsonl, model/)
        compare_run.json                    the engine's record of it (`runs.RUN_RECORD_FILE`)
        analysis.json                       the post-hoc analysis of the final model, where asked for
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdmoe.config_fields import assign, changed_settings
from sdmoe.errors import UserError
from sdmoe.experiments.runs import ANALYSIS_FILE, RUN_RECORD_FILE
from sdmoe.files import (
    DirLock,
    make_dirs,
    probe_writable,
    read_json_or_none,
    read_json_strict,
    remove_made,
    tmp_file_name,
    write_json_atomic,
    write_text_atomic,
)
from sdmoe.train.run_record import read_run_record

# -- the runs: planned, checked, trained or resumed ------------------------------------------------


@dataclass
class PlannedRun:
    """One training run of an experiment: where it lives below --out and what it trains.

    `fields`: its place in the experiment (arm, seed, style, ...), kept in its run record;
    `analysis_rank`: analyse the final model at this subspace rank (None: no analysis)."""

    run_id: str
    config: Any  # a RunConfig, validated before anything is written
    fields: dict[str, Any] = field(default_factory=dict)
    analysis_rank: int | None = None
    dir: str = ""  # below --out; default runs/<run_id>

    def __post_init__(self) -> None:
        self.dir = self.dir or f"runs/{self.run_id}"


def run_config(preset_name: str, overrides: list[str], new_model: dict[str, Any], run: dict[str, Any],
               init: str | None = None, model=None):
    """A run's config as every experiment builds one: its train preset; a new model (`new_model`'s `model.*`
    settings) or one continued from the checkpoint `init` as `train --init` reads it (`model`: that model
    section while the checkpoint is not written yet, for the checks before the first write; SD-MoE then splits
    at the first step, as `start_from_checkpoint` has it); the experiment's `--set`s; then `run`'s settings."""
    from sdmoe.train.config import apply_overrides, preset, refuse_model_settings, set_value, start_from_checkpoint

    rc = preset(preset_name)
    if init and model is not None:
        refuse_model_settings(overrides)
        rc.model, rc.init, rc.sdmoe.split_step = model, init, 0
    elif init:
        start_from_checkpoint(rc, init, overrides)
    else:
        for key, value in new_model.items():
            set_value(rc, key, value)
    apply_overrides(rc, overrides)
    for key, value in run.items():
        set_value(rc, key, value)
    return rc


def validate_runs(runs: list[PlannedRun], what: str) -> None:
    """Every run's config against every rule `sdmoe train` checks, named by the run: a bad --set does not
    wait for its run, and nothing is written before."""
    from sdmoe.train.config import validate

    for run in runs:
        try:
            validate(run.config)
        except UserError as e:
            raise UserError(f"{what} run {run.run_id}: {e}") from None


def run_probes(runs: list[PlannedRun]) -> list[str]:
    """The longest paths the runs write below --out (`sdmoe.files.probe_writable`): the run with the longest
    directory, laid out as `train` lays out a run, with the engine's own files beside it."""
    from sdmoe.train.checkpoint import run_dir_probes

    if not runs:
        return []
    run = max(runs, key=lambda r: len(r.dir.encode("utf-8", "surrogateescape")))
    return [f"{run.dir}/{tmp_file_name(n)}" for n in (RUN_RECORD_FILE, ANALYSIS_FILE)] + \
        [f"{run.dir}/{p}" for p in run_dir_probes(run.config.loop.steps)]


def run_state(run_dir: Path) -> str:
    """"done" | "diverged" | "partial" (resumable) | "new"."""
    mine = read_json_or_none(run_dir / RUN_RECORD_FILE) or {}
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


class Datasets:
    """One prepared dataset per data config (and start checkpoint); one cheap view per seed (its own data
    order). Shared by every run of an experiment, so the text is read and tokenised once."""

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


def train_or_resume(run: PlannedRun, out: Path, datasets: Datasets, device: str | None = None) -> dict[str, Any]:
    """Train `run` into out/<run.dir> unless it is done: a new run from scratch (a started run with nothing
    to resume from is cleared first), a partial one resumed, a diverged one recorded and not retried.
    Returns {"run_id", "action" (trained | resumed | skipped | diverged), "wall_s"}."""
    from sdmoe.train.loop import NonFiniteError, train

    run_dir = out / run.dir
    state = run_state(run_dir)
    rc = run.config
    if device is not None:
        rc.loop.device = device  # where it runs is not part of the experiment: it may move between machines
    mine = read_json_or_none(run_dir / RUN_RECORD_FILE) or {}
    record = {"run_id": run.run_id, "action": "skipped" if state in ("done", "diverged") else state,
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
        mine = {"run_id": run.run_id, **run.fields, "status": status, "error": error, "wall_s": wall,
                "resumes": mine.get("resumes", -1) + 1,
                "trainable_parameters_after_split": trainable_after_split(rc, ds.vocab_size)}
        write_json_atomic(run_dir / RUN_RECORD_FILE, mine)
        record.update(action="diverged" if status == "diverged" else "trained" if state == "new" else "resumed",
                      wall_s=wall)
    if run.analysis_rank and mine.get("status") == "done" and not (run_dir / ANALYSIS_FILE).is_file():
        analyze_run(run_dir, ds or datasets.get(rc), run.analysis_rank)
    return record


# -- the output directory: one experiment, its settings file ------------------------------------------


def saved_config(out: Path, record: str, what: str) -> dict | None:
    """The config in out/<record>; None when there is none; a UserError when it is corrupt."""
    fix = f"restore it, or start the {what} again in another --out"
    saved = read_json_strict(out / record, fix=fix)
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)):
        raise UserError(f"{out / record} holds no {what} config; {fix}")
    return saved["config"] if saved is not None else None


def settings_from_dict(cls: type, raw: dict[str, Any], what: str):
    """A settings dataclass from its saved dict, each value converted and range-checked by its declaration."""
    from sdmoe.config_fields import assign

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise UserError(f"unknown {what} setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    cfg = cls()
    for key, value in raw.items():
        assign(cfg, key, value)
    return cfg


def claim_out_dir(out: Path, cfg, record: str, what: str, adopts: Callable[[Path], bool] | None = None) -> None:
    """Write out/<record> (the experiment's settings), or check that the one there holds the same settings:
    an --out holds one experiment, and re-running the same one resumes it. Any other non-empty --out is
    refused before anything is written into it, unless `adopts` it (an experiment's own folder written before
    its settings file existed)."""
    saved_file = out / record
    if saved_file.is_file():
        # A setting saved before it existed counts as its default; one no run depends on may change.
        changed = changed_settings(saved_config(out, record, what), cfg)
        if any(rule.resume != "any" for _key, rule, _old, _new in changed):
            raise UserError(f"{out} holds a {what} with other settings; use another --out "
                            "(or the same settings to resume it)")
        if changed:
            write_json_atomic(saved_file, {"version": 1, "config": asdict(cfg)})
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out.is_dir() and adopts and adopts(out)):
        raise UserError(f"{out} is not empty and holds no {what}; choose an empty or new --out")
    made: list[Path] = []
    try:
        made = make_dirs(out)
        write_json_atomic(saved_file, {"version": 1, "config": asdict(cfg)})
    except OSError as e:
        remove_made(made)
        raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable --out") from None


# -- one experiment, run the one way -------------------------------------------------------------------


@dataclass
class ExperimentResult:
    out_dir: Path
    config: Any
    text: str  # what the command prints: the headline or the table
    summary: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None  # the main file written (report.html, upcycle.md, ...)
    runs: list[dict[str, Any]] = field(default_factory=list)  # run_id, action, wall_s: what this call did

    def summary_text(self) -> str:
        return self.text


def write_tables(out: Path, stem: str, config: Any, payload: dict[str, Any], text: str) -> ExperimentResult:
    """An arms experiment's report: `<stem>.json` (the figures) and `<stem>.md` (the tables), both atomic."""
    write_json_atomic(out / f"{stem}.json", payload)
    write_text_atomic(out / f"{stem}.md", text)
    return ExperimentResult(out, config, text, payload, out / f"{stem}.md")


def assign_flags(cfg: Any, flags: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The command's flags `keys` set their settings through each setting's declaration (type, range, finite
    numbers; a refusal names the flag), and its `--set`s go after the preset's own overrides."""
    for key in keys:
        if flags.get(key) is not None:
            try:
                assign(cfg, key, flags[key])
            except UserError as e:
                raise UserError(f"--{key.replace('_', '-')}: {e}") from None
    cfg.overrides = list(cfg.overrides) + list(flags.get("overrides") or [])
    return cfg


@dataclass
class Session:
    """What `Experiment.execute` trains with: the --out, the shared datasets, the device and progress, and
    `max_runs` (stop after that many were trained or resumed: an interrupted experiment, for tests)."""

    out: Path
    datasets: Datasets = field(default_factory=Datasets)
    device: str | None = None
    progress: bool = False
    max_runs: int | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        """Whether `max_runs` cut this call short (nothing after the runs, such as timing, should follow)."""
        return self.max_runs is not None and sum(r["action"] != "skipped" for r in self.records) >= self.max_runs

    def train(self, run: PlannedRun) -> dict[str, Any] | None:
        """Train or resume one run (see `train_or_resume`); None once `max_runs` is reached."""
        if self.stopped:
            return None
        record = train_or_resume(run, self.out, self.datasets, self.device)
        self.records.append(record)
        return record

    def train_all(self, runs: list[PlannedRun], desc: str) -> None:
        """Every run in order, behind one progress bar."""
        from tqdm.auto import tqdm

        bar = tqdm(runs, desc=desc, unit="run", disable=not self.progress, dynamic_ncols=True)
        for run in bar:
            bar.set_postfix_str(run.run_id)
            if self.train(run) is None:
                break
        bar.close()

    def checkpoint(self, path: Path, make: Callable[[Path], Any]) -> Path:
        """A checkpoint the runs start from, made once: `make(path)` unless it is there (it writes whole or
        nothing, as `sdmoe upcycle` does)."""
        if not path.is_dir():
            make(path)
        return path

    def say(self, line: str) -> None:
        if self.progress:
            print(line, flush=True)


class Experiment:
    """What an experiment declares; `run_experiment` runs it. Subclasses set the class attributes and
    implement `check`, `execute` and `report`; `probes` names the longest paths it writes."""

    command = ""  # its `sdmoe` subcommand, as messages name it
    what = ""  # its name in messages ("compare", "upcycle compare")
    settings_file = ""  # its settings below --out
    settings: type = object  # the dataclass of its settings

    def __init__(self, config):
        self.config = config

    @classmethod
    def load(cls, out: Path) -> Experiment:
        """The experiment whose settings file is in `out` (`sdmoe report DIR`)."""
        saved = saved_config(out, cls.settings_file, cls.what)
        if saved is None:
            raise UserError(f"{out} holds no {cls.settings_file}; point at a directory written by `sdmoe {cls.command}`")
        return cls(settings_from_dict(cls.settings, saved, cls.what))

    def adopts(self, out: Path) -> bool:
        """Whether a non-empty --out without its settings file is this experiment's own, from before."""
        return False

    def check(self, out: Path) -> None:
        """Every check before the first write; raises a one-line UserError."""
        raise NotImplementedError

    def probes(self, out: Path) -> list[str]:
        """The longest paths below --out it writes, beyond its settings file."""
        return []

    def execute(self, session: Session) -> None:
        """Make its checkpoints and train (or resume) its runs through `session`."""
        raise NotImplementedError

    def report(self, out: Path) -> ExperimentResult:
        """The tables and report, from the run files alone."""
        raise NotImplementedError


def run_experiment(exp: Experiment, out_dir: str | Path, progress: bool = True, device: str | None = "auto",
                   max_runs: int | None = None) -> ExperimentResult:
    """Check everything, claim --out, train or resume every run, report (the module's docstring)."""
    from sdmoe.device import resolve_device

    out = Path(out_dir)
    if device is not None:
        resolve_device(device)  # "cuda" on a machine without one fails before anything is written
    exp.check(out)
    # One experiment per --out: a second one would remove the runs the first is training (a "new" run's
    # directory is cleared before it starts). Held until the report is written.
    with DirLock(out, f"is being written by another `sdmoe {exp.command}`") as lock:
        probe_writable(out, [tmp_file_name(exp.settings_file), *exp.probes(out)])
        claim_out_dir(out, exp.config, exp.settings_file, exp.what, exp.adopts)
        lock.acquire()  # a new --out exists only now
        session = Session(out, device=device, progress=progress, max_runs=max_runs)
        exp.execute(session)
        result = exp.report(out)
    result.runs = session.records
    return result
