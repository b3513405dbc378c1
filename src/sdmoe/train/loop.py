"""The training loop, top to bottom: set-up, resume, the steps (log, monitor, evaluate, save), finish.

    data -> model -> loss (+ balance) -> backward -> optimizer.step()
         -> metrics, evaluation, spectral monitor, checkpoints -> final export

    train():  _set_up -> _resume -> _open_log -> par.parallelize -> _steps -> _finish

The step is plain PyTorch (`train.step.TrainStep`): SD-MoE's gradient split, the
clip, the shared update, the non-finite policy and DeepSeek-V3's bias update run in
the optimizer step's hooks (`sdmoe.attach`), the same for the baseline and SD-MoE.
How the run is spread over processes (one, DDP, FSDP2) is one object chosen at set-up
(`train.parallel`), so the loop never asks which; torch's process-wide settings
(threads, deterministic algorithms, the seed) hold for the run and are put back after
it (`train.process_state`).

Everything a resumed run needs is in the checkpoint: batches are a pure
function of (seed, step), the schedule a pure function of the step, and the
SD-MoE structure is rebuilt from `state.json` before the weights load. A run
stopped at step k and resumed gives the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.config_fields import changed_settings, show
from sdmoe.data import prepare_dataset
from sdmoe.data.dataset import Dataset, passes_over_data
from sdmoe.errors import UserError
from sdmoe.eval.perplexity import evaluate_loss
from sdmoe.files import DirLock, atomic_dir, make_dirs, probe_writable, remove_made, write_failure
from sdmoe.method.driver import first_nonfinite_grad
from sdmoe.method.export import with_kv_cache
from sdmoe.models import count_parameters
from sdmoe.models.checks import check_checkpoint, check_finite_parameters, check_tokenizer_fits
from sdmoe.models.pretrained import load_tokenizer
from sdmoe.train import checkpoint as ckpt
from sdmoe.train import parallel
from sdmoe.train.config import RunConfig, from_dict, upgraded, validate
from sdmoe.train.metrics import MetricsLog, NullLog, read_metrics, truncate_after
from sdmoe.train.optim import build_optimizer, lr_scale, set_learning_rates
from sdmoe.train.parallel import Parallelism
from sdmoe.train.process_state import process_state
from sdmoe.train.run_record import read_run_record, run_record_path, write_run_record
from sdmoe.train.step import TrainStep


class NonFiniteError(UserError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None
    steps: int
    val_loss: dict[str, float]
    unigram_entropy: float
    seconds: float
    trainable_parameters: int
    rank: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # steps loop.nan_policy=skip dropped (non-finite loss or gradients), resumed runs included

    def summary(self) -> str:
        mean = self.val_loss.get("mean", float("nan"))
        per = ", ".join(f"{k} {v:.3f}" for k, v in self.val_loss.items() if k != "mean")
        skipped = f", {self.skipped} skipped (non-finite loss or gradients)" if self.skipped else ""
        # A run that skipped most of its steps barely trained: say so where it cannot be missed.
        warning = (f"\nWARNING: {self.skipped} of {self.steps} steps were skipped, the model barely trained; "
                   "lower optim.lr (or raise optim.warmup) and train again") if self.skipped * 2 > self.steps else ""
        return (
            f"trained {self.steps} steps{skipped} in {self.seconds:.0f}s; validation loss {mean:.3f} nats/token "
            f"({per}); unigram entropy of the corpus {self.unigram_entropy:.3f} nats/token"
            + (f"; model saved to {self.model_dir}" if self.model_dir else "") + warning
        )


# -- output directory ----------------------------------------------------------


def check_out_dir(out: Path, cfg: RunConfig, resume: bool) -> None:
    """Refuse to mix runs: a resume of another config, a new run into a used directory (nothing written)."""
    run_file = run_record_path(out)
    if resume:
        record = read_run_record(out, strict=True, fix="it records the run's settings: restore it, or start a new "
                                                        "run in another --out")
        if record is None:
            raise UserError(f"nothing to resume in {out}: it holds no run.json; drop --resume to start a new run")
        saved = upgraded(record["config"])
        method = saved.get("method")
        if method != cfg.method:
            raise UserError(f"--resume with method {cfg.method!r} but {out} holds a {method!r} run")
        # A resume reproduces the interrupted run: only settings declared resume="any" (logging,
        # evaluation, checkpoints kept, threads) may change, and loop.steps may grow ("grow").
        for key, rule, old, new in changed_settings(saved, cfg):
            section = key.split(".")[0] if "." in key else ""
            if rule.resume == "any" or (section == "sdmoe" and cfg.method == "baseline"):  # a baseline ignores it
                continue
            if rule.resume == "grow" and isinstance(old, (int, float)) and new > old:
                continue  # extends the run; documented in docs/reliability.md (the schedule spans the new length)
            what = "shorten" if rule.resume == "grow" else "change"
            raise UserError(
                f"--resume with a different {section or 'run'} config than the run in {out}: {key}={show(new)}, "
                f"but the run was written with {key}={show(old)}; a resume may not {what} it: resume with "
                f"--set {key}={_as_set_value(old)}, or start a new run in another --out"
            )
    elif out.exists() and any(out.iterdir()):
        if run_file.is_file():
            raise UserError(f"output directory {out} holds a previous run; pass --resume to continue it or choose another --out")
        raise UserError(f"output directory {out} is not empty and holds no sdmoe run; choose an empty or new --out")


def _as_set_value(value: Any) -> str:
    """`value` as `--set key=...` takes it back."""
    return value if isinstance(value, str) else json.dumps(value)


# -- the run --------------------------------------------------------------------


class NonFiniteWatch:
    """The first step whose loss or gradient norm was not finite, kept on the device.

    Testing `math.isfinite(loss.item())` every step would make the host wait for the
    device every step; this records the step in a device tensor instead, and the loop
    reads it where it reads values anyway."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, *values: torch.Tensor) -> None:
        bad = ~torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all()
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def first_step(self) -> int | None:
        step = int(self.first)
        return None if step < 0 else step

    def reset(self) -> None:
        self.first.fill_(-1)


@dataclass
class Run:
    """One run between its parts: `_set_up` makes it, `_resume` moves it to its last checkpoint, `_steps`
    trains it, `_finish` exports it. `par` is its parallelism (one process, DDP or FSDP2)."""

    cfg: RunConfig
    out: Path
    par: Parallelism
    data: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_step: TrainStep  # forward, backward, optimizer.step() (in its hooks SD-MoE, the clip, the bias update)
    started: float  # perf_counter() when the set-up was done
    log: MetricsLog | NullLog = field(default_factory=NullLog)
    start_step: int = 0
    skipped: int = 0  # steps loop.nan_policy=skip dropped, a resumed run's earlier ones included

    @property
    def handle(self):
        """`sdmoe.attach`'s handle: the split, its state, the last step's gradient norm and whether it was skipped."""
        return self.train_step.handle

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    dataset=None,
) -> TrainResult:
    """Train `cfg` into `out_dir`. `stop_after` ends early after that many steps
    (with a checkpoint), as an interrupted run would; `dataset` reuses prepared data."""
    # Released however the run ends, last taken first: the metrics file, the hooks, torch's process
    # settings, the directories a run that failed before writing made, the lock on `out_dir`.
    with ExitStack() as held:
        run = _set_up(cfg, Path(out_dir), resume, dataset, held)
        optim_state = _resume(run, resume)
        _open_log(run, held)
        # The model ready for its steps: DDP wraps it; FSDP2 splits it (SD-MoE) and shards it.
        run.train_step.engine = run.par.parallelize(run.model, run.optimizer, run.handle)
        if optim_state is not None:  # now: FSDP2's optimizer holds the sharded parameters only once sharded
            run.par.load_optimizer_state(run.model, run.optimizer, optim_state)
        end_step = cfg.loop.steps if stop_after is None else min(cfg.loop.steps, run.start_step + stop_after)
        val_loss = _steps(run, end_step, progress)
        model_dir, val_loss = _finish(run, end_step, val_loss)
        run.par.barrier()
        run.par.close()
        return TrainResult(run.out, model_dir, end_step, val_loss, run.data.unigram_entropy_nats,
                           time.perf_counter() - run.started, count_parameters(run.model), rank=run.par.rank,
                           skipped=run.skipped)


# -- set-up: the output directory (locked), the data, the model, the optimizer, the step -------------------


def _set_up(cfg: RunConfig, out: Path, resume: bool, dataset, held: ExitStack) -> Run:
    """Every check first, then the output directory, then the model: a refusal leaves the disk as it was."""
    validate(cfg)
    par = parallel.choose(cfg)  # before the lock: a missing GPU fails before anything is written
    # --init: a checkpoint that cannot load fails before anything is written too; its own tokenizer
    # tokenises the text, its weights are the start
    tokenizer = load_tokenizer(cfg.init) if cfg.init else None
    init_model = _load_init_model(cfg, par, tokenizer) if cfg.init else None
    lock = _check_out_dir(out, cfg, resume, held) if par.is_main else None
    # the text is read (and refused) before the output directory exists
    data = dataset or prepare_dataset(cfg.data, seed=cfg.loop.seed, tokenizer=tokenizer)
    if par.is_main:
        _make_out_dir(out, lock, held)
    par.barrier()
    started = time.perf_counter()
    held.enter_context(process_state(cfg.loop, par.device))  # threads, determinism, seed: put back at the end
    model = init_model if init_model is not None else par.build(cfg, data.tokenizer)
    optimizer = build_optimizer(model, cfg.optim)
    reference_batch = next(iter(data.val.values()))[0].to(par.device)
    # SD-MoE, the clip, the non-finite policy and the bias update run in optimizer.step()'s hooks
    train_step = TrainStep(cfg, model, optimizer, par.device, reference_batch, reduce=par.sum_)
    held.callback(train_step.close)
    return Run(cfg, out, par, data, model, optimizer, train_step, started)


def _load_init_model(cfg: RunConfig, par: Parallelism, tokenizer) -> nn.Module:
    """`--init`'s model: its config.json against every tensor's header and its top-k against its experts
    before it loads; a NaN in it, or token ids past its embedding, after. One line each, nothing written."""
    check_checkpoint(cfg.init)
    model = par.load_init(cfg.init)
    check_finite_parameters(model, cfg.init)
    check_tokenizer_fits(tokenizer, model.get_input_embeddings().num_embeddings, cfg.init)
    return model


# -- resume: the last checkpoint's weights, SD-MoE state, RNG and step ---------------------------------


def _resume(run: Run, resume: bool) -> dict | None:
    """`run` at its last checkpoint (a new run: its run.json written); returns the checkpoint's optimizer
    state, which loads once the model is parallelized (None when there is none)."""
    par, metrics = run.par, run.out / "metrics.jsonl"
    if par.is_main:
        ckpt.clean_partial(run.ckpt_root)
        ckpt.clean_partial(run.out)  # a final model or run.json a killed process was writing
    found = ckpt.list_checkpoints(run.ckpt_root) if resume else []
    if not found:
        if par.is_main:
            if resume:  # killed before its first checkpoint: start over, without the dead run's records
                truncate_after(metrics, -1)
            write_run_record(run.out, run.cfg.to_dict(), "running")
        return None
    model_state, optim_state, state = ckpt.load_checkpoint(found[-1])
    written_by = state.get("parallel", "ddp")
    if written_by != par.checkpoint_format:  # the optimizer state's format: by tensor (ddp) or by name (fsdp)
        how = ("with --set loop.parallel=fsdp under torchrun" if written_by == "fsdp"
               else "without loop.parallel=fsdp (it was a DDP or one-process run)")
        raise UserError(f"the checkpoint in {found[-1]} was written with loop.parallel={written_by}; resume it {how}")
    # before the optimizer's state: a split run's optimizer has the split's groups
    run.handle.load_state_dict(_sdmoe_state(found[-1], state))
    par.load_model_state(run.model, model_state)
    run.train_step.load_state_dict(state.get("aux"))  # Guo et al.'s weights, fixed at the first step
    ckpt.set_rng_state(state["rng"])
    run.start_step = run.handle.step = state["step"]
    if par.is_main:
        truncate_after(metrics, run.start_step)
        run.skipped = sum(r.get("event") == "skipped" for r in read_metrics(metrics))
    return optim_state


def _open_log(run: Run, held: ExitStack) -> None:
    """The metrics log (rank 0's; other ranks log nothing), its start record, and the SD-MoE events in it."""
    metrics = run.out / "metrics.jsonl"
    run.log = MetricsLog(metrics, tensorboard_dir=run.out / "tensorboard") if run.par.is_main else NullLog()
    held.callback(run.log.close)
    cfg, data = run.cfg, run.data
    if run.start_step == 0:
        held_tokens = sum(len(t) for t in data.train_tokens.values())
        run.log.write({"event": "start", "step": 0, "trainable_parameters": count_parameters(run.model),
                       "unigram_entropy": data.unigram_entropy_nats, "domains": data.domains,
                       "train_tokens": held_tokens,
                       "passes": passes_over_data(cfg.loop.steps, cfg.data.batch_size, cfg.data.seq_len, held_tokens)})

    def on_split(step: int, record: dict) -> None:
        ctl = run.handle.controller
        run.par.broadcast_(ctl.buffers())  # bases computed once, identical on every rank
        run.log.write({"event": "split", "step": step, "ranks_agree": run.par.agree(ctl.buffers()),
                       "trainable_parameters": count_parameters(run.model) + ctl.num_shared_parameters(), **record})

    run.handle.on("split", on_split)
    run.handle.on("reestimate", lambda step, record: run.log.write({"event": "reestimate", "step": step, **record}))


# -- the steps ---------------------------------------------------------------------------------------------


def _steps(run: Run, end_step: int, progress: bool) -> dict[str, float]:
    """Steps `run.start_step` to `end_step`, logging, monitoring, evaluating and saving where due; returns
    the last evaluation's validation losses ({} if none ran)."""
    cfg, lc, par = run.cfg, run.cfg.loop, run.par
    model, optimizer, train_step, handle, log = run.model, run.optimizer, run.train_step, run.handle, run.log
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bar = tqdm(range(run.start_step, end_step), initial=run.start_step, total=lc.steps, desc=cfg.name,
               disable=not (progress and par.is_main), unit="step", dynamic_ncols=True)
    val_loss: dict[str, float] = {}
    window_t0, window_steps = time.perf_counter(), 0
    nonfinite = NonFiniteWatch(par.device)
    model.train()
    for step in bar:
        lr = set_learning_rates(optimizer, cfg.optim.lr, lr_scale(step, lc.steps, cfg.optim))
        input_ids_BS, _ = run.data.train.sample(step)
        losses = train_step(par.batch(input_ids_BS).to(par.device))  # forward, backward, optimizer.step()
        if handle.skipped:  # loop.nan_policy=skip: the step's gradients were not finite and nothing changed
            optimizer.zero_grad(set_to_none=True)
            run.skipped += 1
            log.write({"event": "skipped", "step": step, "loss": losses.lm.item(), "nonfinite": handle.nonfinite_grad})
            continue
        if lc.nan_policy == "stop":
            nonfinite.update(step, losses.lm, handle.grad_norm)
        done = step + 1
        due_log = done % lc.log_every == 0 or done == lc.steps
        due_monitor = bool(lc.monitor_every) and done % lc.monitor_every == 0
        due_eval = done % lc.eval_every == 0 or done == lc.steps
        due_save = done % lc.checkpoint_every == 0 or done == end_step
        # Reading a value from the device makes the host wait for it: the loop reads only at steps that
        # read anyway (log, monitor, eval, checkpoint), so a bad step is found there, before it is saved.
        if (due_log or due_monitor or due_eval or due_save) and (bad := nonfinite.first_step()) is not None:
            _stop_on_nonfinite(bad, step, model, log, run.ckpt_root)
        monitor = None
        if due_monitor:  # before zero_grad: its gradient overlaps read this step's split gradients
            monitor = spectral_snapshot(model, lc.monitor_rank)
            if handle.controller is not None and handle.controller.split_done:
                monitor["sdmoe"] = handle.controller.monitor(lc.monitor_rank)
        optimizer.zero_grad(set_to_none=True)

        # -- log, monitor, evaluate, save ------------------------------------------------------------------
        window_steps += 1
        if due_log:
            loss = par.mean(losses.lm.item())
            elapsed = time.perf_counter() - window_t0
            tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": handle.grad_norm.item(),
                      "tokens_per_s": tok_s, "step_time": elapsed / window_steps,
                      "load": train_step.loads.take_window().tolist()}
            if losses.balance is not None:
                record["balance_loss"] = losses.balance.item()
            if losses.aux is not None:  # Guo et al.'s terms: weighted sum, and each unweighted (layer mean)
                record["aux_loss"] = losses.aux.item()
                record.update({f"{k}_loss": v for k, v in train_step.specialise.last.items()})
            log.write(record)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            window_t0, window_steps = time.perf_counter(), 0
        if monitor is not None:
            log.write({"event": "monitor", "step": done, **monitor})
        if due_eval:
            val_loss = evaluate_loss(model, run.data.val, par.device)
            log.write({"event": "eval", "step": done, "val": val_loss})
            if par.is_main and progress:
                bar.write(f"step {done}: validation loss {val_loss['mean']:.3f}")
        if due_save:
            _save(run, done)
    bar.close()
    return val_loss


def _save(run: Run, step: int) -> None:
    """Checkpoint `step`: the whole model and optimizer state, SD-MoE's state, the RNG (rank 0 writes)."""
    model_state, optim_state = run.par.state_dicts(run.model, run.optimizer)  # FSDP2: collective
    if not run.par.is_main:
        return
    sd = run.handle.state_dict()
    state = {"config": run.cfg.to_dict(), "parallel": run.par.checkpoint_format,
             "sdmoe": {"version": sd["version"], "split_done": sd["split_done"]} if sd else {},
             "aux": run.train_step.state_dict()}
    try:
        ckpt.save_checkpoint(run.ckpt_root, step, model_state, optim_state, state, run.cfg.loop.keep_checkpoints, sd)
    except Exception as e:  # torch and safetensors raise their own types for a full disk
        if (why := write_failure(e)) is None:
            raise
        raise UserError(f"could not write checkpoint {step} to {run.ckpt_root} ({why}); free space or fix "
                        "permissions, then --resume") from None


# -- finish: the final model, a plain transformers checkpoint ----------------------------------------------


def _finish(run: Run, end_step: int, val_loss: dict[str, float]) -> tuple[Path | None, dict[str, float]]:
    """A run that reached loop.steps: its validation losses, its model exported and saved, run.json "done".
    Returns (the model's directory, or None: stopped early, or not rank 0; the validation losses)."""
    if end_step < run.cfg.loop.steps:  # stopped early (stop_after): its last checkpoint resumes it
        return None, val_loss
    if not val_loss:  # on every rank: a forward under FSDP2 is collective
        val_loss = evaluate_loss(run.model, run.data.val, run.par.device)
    final = run.par.final_model(run.model, run.cfg, run.data.tokenizer)  # FSDP2: gathered (collective)
    if not run.par.is_main:
        return None, val_loss
    run.handle.export(final)  # a residual router folded into its weight; hooks removed
    target = run.out / "model"
    try:
        model_dir = save_final_model(final, run.data.tokenizer, target)
        write_run_record(run.out, run.cfg.to_dict(), "done", val_loss=val_loss, skipped_steps=run.skipped)
    except Exception as e:  # safetensors and tokenizers raise their own types for a full disk
        if (why := write_failure(e)) is None:
            raise
        raise UserError(f"could not write the final model to {target} ({why}); "
                        "free space or fix permissions, then --resume") from None
    return model_dir, val_loss


def _check_out_dir(out: Path, cfg: RunConfig, resume: bool, held: ExitStack) -> DirLock:
    """Lock `out` for this process, check a resume's run.json, probe that every path the run writes fits:
    every refusal about the output before the data is read, and nothing written."""
    # One process per run directory: a second one's start-up clean-up would delete the first's temp files.
    # Taken before anything looks inside, and again once a new directory exists (a no-op when held).
    lock = held.enter_context(DirLock(out, "is being trained by another process"))
    if resume:
        read_run_record(out, strict=True, fix="restore it, or start a new run in another --out")
    # Every directory the run writes can take its longest name: a path that cannot hold the final model
    # fails now, not after all the training.
    probe_writable(out, ckpt.run_dir_probes(cfg.loop.steps))
    check_out_dir(out, cfg, resume)
    return lock


def _make_out_dir(out: Path, lock: DirLock, held: ExitStack) -> None:
    """Create `out` (and its parents) once every check has passed; a run that then fails before it writes
    anything (its run.json) takes back the directories it made."""
    made: list[Path] = []
    try:
        made = make_dirs(out)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        remove_made(made)
        raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable --out") from None
    held.push(lambda failed, *_: remove_made(made) if failed else None)
    lock.acquire()


def _stop_on_nonfinite(bad: int, step: int, model: torch.nn.Module, log, ckpt_root: Path) -> None:
    """loop.nan_policy=stop: record and raise, keeping the last good checkpoint."""
    # One step number, counted as the metrics count them (record "step": N is the N-th step). The device
    # is read only at log/eval/checkpoint steps, so `bad` may be earlier than this step; the gradients
    # then are no longer the first bad ones.
    first = bad + 1
    culprit = f" (first non-finite gradient: {first_nonfinite_grad(model)})" if bad == step else ""
    log.write({"event": "nonfinite", "step": first, "policy": "stop"})
    last = ckpt.list_checkpoints(ckpt_root)
    raise NonFiniteError(f"the loss or gradient norm is not finite at step {first}{culprit}; last good checkpoint: "
                         f"{last[-1].name if last else 'none'}; lower optim.lr or use --set loop.nan_policy=skip")


def _sdmoe_state(checkpoint: Path, state: dict) -> dict:
    """The SD-MoE state a checkpoint holds (an unsplit one if it was written before the split)."""
    sd = ckpt.load_sdmoe_state(checkpoint)
    if sd is not None:
        return sd
    if state.get("sdmoe", {}).get("split_done"):  # the parametrization engine kept it in state.json
        return state["sdmoe"]
    return {"version": 2, "split_done": False}


def save_final_model(model, tokenizer, target: Path) -> Path:
    """`save_pretrained` into a temp dir beside `target`, then rename: never half a model.

    Training is over: the saved config turns the KV cache on (it was off for training).
    """
    with_kv_cache(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_run_config(out_dir: str | Path) -> RunConfig:
    record = read_run_record(out_dir, strict=True, fix="point at a directory written by `sdmoe train`")
    if record is None:
        raise UserError(f"{out_dir} holds no run.json; point at a directory written by `sdmoe train`")
    return from_dict(record["config"])
