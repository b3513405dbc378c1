"""The training loop, top to bottom: set-up, resume, the steps (log, monitor, evaluate, save), finish.

    data -> model -> loss (+ balance) -> backward -> optimizer.step()
         -> metrics, evaluation, spectral monitor, checkpoints -> final export

The step is plain PyTorch (`train.step.TrainStep`): SD-MoE's gradient split, the
clip, the shared update, the non-finite policy and DeepSeek-V3's bias update run in
the optimizer step's hooks (`sdmoe.attach`), the same for the baseline and SD-MoE.

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
from tqdm.auto import tqdm

from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.config_fields import changed_settings, show
from sdmoe.data import prepare_dataset
from sdmoe.data.dataset import passes_over_data
from sdmoe.errors import UserError
from sdmoe.eval.perplexity import evaluate_loss
from sdmoe.files import DirLock, atomic_dir, make_dirs, probe_writable, remove_made, write_failure
from sdmoe.method.driver import first_nonfinite_grad
from sdmoe.method.export import with_kv_cache
from sdmoe.models import count_parameters
from sdmoe.models.checks import check_checkpoint, check_finite_parameters, check_tokenizer_fits
from sdmoe.models.pretrained import for_training, load_init_model, load_tokenizer
from sdmoe.train import checkpoint as ckpt
from sdmoe.train import distributed as dist
from sdmoe.train import fsdp as fsdp_train
from sdmoe.train.config import RunConfig, from_dict, upgraded, validate
from sdmoe.train.metrics import MetricsLog, NullLog, read_metrics, truncate_after
from sdmoe.train.optim import build_optimizer, lr_scale, set_learning_rates
from sdmoe.train.run_record import read_run_record, run_record_path, write_run_record
from sdmoe.train.step import TrainStep, start_model


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
    with ExitStack() as held:  # the lock on `out_dir`, released however the run ends
        return _train(cfg, out_dir, resume, progress, stop_after, dataset, held)


def _train(cfg: RunConfig, out_dir: str | Path, resume: bool, progress: bool, stop_after: int | None, dataset,
           held: ExitStack) -> TrainResult:
    # -- set-up: the output directory (locked), the data, the model, the optimizer, the step ---------------
    validate(cfg)
    out = Path(out_dir)
    ctx = dist.setup(cfg.loop.device)  # before the lock: a missing GPU fails before anything is written
    # --init: a checkpoint that cannot load fails before anything is written too; its own tokenizer
    # tokenises the text, its weights are the start
    tokenizer = load_tokenizer(cfg.init) if cfg.init else None
    fsdp = ctx.enabled and cfg.loop.parallel == "fsdp"
    # FSDP2 from a checkpoint (or a new model with loop.meta_init): built on the meta device, each rank
    # reads (draws) only its slices, no rank ever holds the whole model; the split then runs on the shards
    sharded_init = fsdp and (bool(cfg.init) or cfg.loop.meta_init)
    if cfg.init:  # config.json against every tensor's header, top-k against the experts: one line each
        check_checkpoint(cfg.init)
    if sharded_init and cfg.init:
        init_model = for_training(fsdp_train.from_pretrained_sharded(cfg.init), ctx.device)
    else:
        init_model = load_init_model(cfg.init, ctx.device) if cfg.init else None
    if init_model is not None:  # a NaN in the checkpoint, or ids past its embedding: refused before any write
        check_finite_parameters(init_model, cfg.init)
        check_tokenizer_fits(tokenizer, init_model.get_input_embeddings().num_embeddings, cfg.init)
    lc = cfg.loop
    lock = _check_out_dir(out, cfg, resume, held) if ctx.is_main else None
    # the text is read (and refused) before the output directory exists
    data = dataset or prepare_dataset(cfg.data, seed=lc.seed, tokenizer=tokenizer)
    if ctx.is_main:
        _make_out_dir(out, lock, held)
    dist.barrier(ctx)
    started = time.perf_counter()

    if lc.threads > 0:
        torch.set_num_threads(lc.threads)
    if lc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(lc.seed)
    device = ctx.device
    if init_model is not None:
        model = init_model
    elif sharded_init:
        model = fsdp_train.build_sharded(cfg.model, len(data.tokenizer), seed=lc.seed,
                                         eos_token_id=data.tokenizer.eos_token_id)
    else:
        model = start_model(cfg, data.tokenizer, device)
    optimizer = build_optimizer(model, cfg.optim)
    reference_batch = next(iter(data.val.values()))[0].to(device)
    # SD-MoE, the clip, the non-finite policy and the bias update run in optimizer.step()'s hooks
    train_step = TrainStep(cfg, model, optimizer, device, reference_batch, reduce=lambda t: dist.sum_across_(t, ctx))
    handle = train_step.handle

    # -- resume: the last checkpoint's weights, optimizer, SD-MoE state, RNG and step ----------------------
    ckpt_root = out / "checkpoints"
    if ctx.is_main:
        ckpt.clean_partial(ckpt_root)
        ckpt.clean_partial(out)  # a final model or run.json a killed process was writing
    start_step, optim_state, skipped = 0, None, 0
    if resume and (found := ckpt.list_checkpoints(ckpt_root)):
        model_state, optim_state, state = ckpt.load_checkpoint(found[-1])
        written_by = state.get("parallel", "ddp")  # the optimizer state's format: by tensor (ddp) or by name (fsdp)
        if written_by != ("fsdp" if fsdp else "ddp"):
            how = ("with --set loop.parallel=fsdp under torchrun" if written_by == "fsdp"
                   else "without loop.parallel=fsdp (it was a DDP or one-process run)")
            raise UserError(f"the checkpoint in {found[-1]} was written with loop.parallel={written_by}; resume it "
                            f"{how}")
        # before the optimizer's state: a split run's optimizer has the split's groups
        handle.load_state_dict(_sdmoe_state(found[-1], state))
        if sharded_init:  # every rank has the whole state; each keeps its slices
            fsdp_train.load_model_state(model, model_state)
        else:
            model.load_state_dict(model_state)
        if not fsdp:  # FSDP2: loaded once the optimizer holds the sharded parameters
            optimizer.load_state_dict(optim_state)
        ckpt.set_rng_state(state["rng"])
        start_step = handle.step = state["step"]
        if ctx.is_main:
            truncate_after(out / "metrics.jsonl", start_step)
            skipped = sum(r.get("event") == "skipped" for r in read_metrics(out / "metrics.jsonl"))
    elif ctx.is_main:
        if resume:  # killed before its first checkpoint: start over, without the dead run's records
            truncate_after(out / "metrics.jsonl", -1)
        write_run_record(out, cfg.to_dict(), "running")
    log = MetricsLog(out / "metrics.jsonl", tensorboard_dir=out / "tensorboard") if ctx.is_main else NullLog()
    if start_step == 0:
        held_tokens = sum(len(t) for t in data.train_tokens.values())
        log.write({"event": "start", "step": 0, "trainable_parameters": count_parameters(model),
                   "unigram_entropy": data.unigram_entropy_nats, "domains": data.domains, "train_tokens": held_tokens,
                   "passes": passes_over_data(cfg.loop.steps, cfg.data.batch_size, cfg.data.seq_len, held_tokens)})

    def on_split(step: int, record: dict) -> None:
        ctl = handle.controller
        dist.broadcast_tensors(ctl.buffers(), ctx)  # bases computed once, identical on every rank
        log.write({"event": "split", "step": step, "ranks_agree": dist.tensors_agree(ctl.buffers(), ctx),
                   "trainable_parameters": count_parameters(model) + ctl.num_shared_parameters(), **record})

    handle.on("split", on_split)
    handle.on("reestimate", lambda step, record: log.write({"event": "reestimate", "step": step, **record}))
    if fsdp:  # FSDP2 shards the split model (split_step is 0): split, shard, then the optimizer's state
        if sharded_init:  # sharded already: the split builds its state from the local shards
            fsdp_train.check_sdmoe(handle.controller, split_on_shards=True)
            handle.split()
        else:
            handle.split()
            fsdp_train.shard_for_training(model, optimizer, handle.controller)
        if optim_state is not None:
            fsdp_train.load_optimizer_state(model, optimizer, optim_state)
    else:
        train_step.engine = dist.wrap(model, ctx)  # DDP in a torchrun launch, the model itself otherwise

    def save(step: int) -> None:
        if fsdp:  # collective: every rank gathers, rank 0 receives the whole state
            model_state, optim_state = fsdp_train.full_state_dicts(model, optimizer)
        if not ctx.is_main:
            return
        if not fsdp:
            model_state, optim_state = model.state_dict(), optimizer.state_dict()
        sd = handle.state_dict()
        state = {"config": cfg.to_dict(), "parallel": "fsdp" if fsdp else "ddp",
                 "sdmoe": {"version": sd["version"], "split_done": sd["split_done"]} if sd else {}}
        try:
            ckpt.save_checkpoint(ckpt_root, step, model_state, optim_state, state, lc.keep_checkpoints, sd)
        except Exception as e:  # torch and safetensors raise their own types for a full disk
            if (why := write_failure(e)) is None:
                raise
            raise UserError(f"could not write checkpoint {step} to {ckpt_root} ({why}); free space or fix permissions, then --resume") from None

    # -- the steps ---------------------------------------------------------------------------------------
    end_step = cfg.loop.steps if stop_after is None else min(cfg.loop.steps, start_step + stop_after)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bar = tqdm(range(start_step, end_step), initial=start_step, total=cfg.loop.steps, desc=cfg.name,
               disable=not (progress and ctx.is_main), unit="step", dynamic_ncols=True)
    val_loss: dict[str, float] = {}
    window_t0, window_steps = time.perf_counter(), 0
    nonfinite = NonFiniteWatch(device)
    model.train()
    for step in bar:
        lr = set_learning_rates(optimizer, cfg.optim.lr, lr_scale(step, cfg.loop.steps, cfg.optim))
        input_ids, _ = data.train.sample(step)
        losses = train_step(dist.shard_batch(input_ids, ctx).to(device))  # forward, backward, optimizer.step()
        lm_loss, balance = losses.lm, losses.balance
        if handle.skipped:  # loop.nan_policy=skip: the step's gradients were not finite and nothing changed
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            log.write({"event": "skipped", "step": step, "loss": lm_loss.item(), "nonfinite": handle.nonfinite_grad})
            continue
        if lc.nan_policy == "stop":
            nonfinite.update(step, lm_loss, handle.grad_norm)
        done = step + 1
        due_log = done % lc.log_every == 0 or done == cfg.loop.steps
        due_monitor = bool(lc.monitor_every) and done % lc.monitor_every == 0
        due_eval = done % lc.eval_every == 0 or done == cfg.loop.steps
        due_save = done % lc.checkpoint_every == 0 or done == end_step
        # Reading a value from the device makes the host wait for it: the loop reads only at steps that
        # read anyway (log, monitor, eval, checkpoint), so a bad step is found there, before it is saved.
        if (due_log or due_monitor or due_eval or due_save) and (bad := nonfinite.first_step()) is not None:
            _stop_on_nonfinite(bad, step, model, log, ckpt_root)
        monitor = None
        if due_monitor:  # before zero_grad: its gradient overlaps read this step's split gradients
            monitor = spectral_snapshot(model, lc.monitor_rank)
            if handle.controller is not None and handle.controller.split_done:
                monitor["sdmoe"] = handle.controller.monitor(lc.monitor_rank)
        optimizer.zero_grad(set_to_none=True)

        # -- log, monitor, evaluate, save ----------------------------------------------------------------
        window_steps += 1
        if due_log:
            loss_value = dist.mean_across(lm_loss.item(), ctx)
            elapsed = time.perf_counter() - window_t0
            tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": handle.grad_norm.item(),
                      "tokens_per_s": tok_s, "step_time": elapsed / window_steps,
                      "load": train_step.loads.take_window().tolist()}
            if balance is not None:
                record["balance_loss"] = balance.item()
            log.write(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
            window_t0, window_steps = time.perf_counter(), 0
        if monitor is not None:
            log.write({"event": "monitor", "step": done, **monitor})
        if due_eval:
            val_loss = evaluate_loss(model, data.val, device)
            log.write({"event": "eval", "step": done, "val": val_loss})
            if ctx.is_main and progress:
                bar.write(f"step {done}: validation loss {val_loss['mean']:.3f}")
        if due_save:
            save(done)
    bar.close()

    # -- finish: the final model, a plain transformers checkpoint ----------------------------------------
    model_dir = None
    if end_step >= cfg.loop.steps:
        if not val_loss:  # on every rank: a forward under FSDP2 is collective
            val_loss = evaluate_loss(model, data.val, device)
        # FSDP2: the whole weights gathered into a plain copy on rank 0 (collective)
        final = _unsharded_model(model, cfg, data.tokenizer) if fsdp else model
        if ctx.is_main:
            handle.export(final)  # a residual router folded into its weight; hooks removed
            try:
                model_dir = save_final_model(final, data.tokenizer, out / "model")
                write_run_record(out, cfg.to_dict(), "done", val_loss=val_loss, skipped_steps=skipped)
            except Exception as e:  # safetensors and tokenizers raise their own types for a full disk
                if (why := write_failure(e)) is None:
                    raise
                raise UserError(f"could not write the final model to {out / 'model'} ({why}); "
                                "free space or fix permissions, then --resume") from None
    log.close()
    train_step.close()
    dist.barrier(ctx)
    dist.cleanup(ctx)
    return TrainResult(out, model_dir, end_step, val_loss, data.unigram_entropy_nats,
                       time.perf_counter() - started, count_parameters(model), rank=ctx.rank, skipped=skipped)


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
    log.close()
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


def _unsharded_model(model, cfg: RunConfig, tokenizer) -> torch.nn.Module | None:
    """An FSDP2 model's whole weights in a plain copy on rank 0 (None elsewhere); collective."""
    state, _ = fsdp_train.full_state_dicts(model)
    if not state:
        return None
    plain = start_model(cfg, tokenizer, "cpu")
    plain.load_state_dict(state)  # the model is plain at every step: same keys, sharded or not
    return plain


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
