"""SD-MoE inside `transformers.Trainer`, as one callback.

    from sdmoe import SDMoEConfig, SDMoETrainerCallback, export
    cb = SDMoETrainerCallback(SDMoEConfig(split_step=100))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(); export(trainer.model)   # then trainer.save_model(...): a plain checkpoint

The model stays the Trainer's plain model throughout; SD-MoE runs in hooks on the
Trainer's (unwrapped) optimizer and model, `sdmoe.attach`, as in every other caller.
The callback only sets them up and reports (transformers 5.x events):

    on_init_end           split_step == 0: split now, before accelerate wraps the model
    on_train_begin        `sdmoe.attach` on the Trainer's optimizer (accelerate's
                          AcceleratedOptimizer unwrapped), the clipping taken over
    on_step_begin         the driver's step count follows `state.global_step`
    [forward: at split_step the driver splits and binds the optimizer]
    [backward, optimizer.step(): the driver's hooks split the gradients, clip, fold the shared
     update into the experts, re-project tails, re-estimate bases]
    on_pre_optimizer_step the spectral monitor when due
    on_log                the monitor's and the split's numbers join the Trainer's log record

Clipping order. The Trainer clips BEFORE the optimizer's step, but SD-MoE splits the
gradient and then clips (as `sdmoe train` does). So at `on_train_begin` the callback takes
the clipping over: it stores `args.max_grad_norm`, sets it to 0 for the run (restored at
`on_train_end`) and gives it to the driver, which clips the model's and the shared parts' gradients
right after the split. The Trainer's logged `grad_norm` is then the norm before the split and before
clipping. With `fp16=True` (a GradScaler: gradients are still scaled at that point) the callback leaves
clipping to the Trainer; the split then follows the clip, which is correct up to the clip coefficient
(the split is linear and never increases the norm, so the clipped norm bound still holds).

Limits. Multi-process runs (DDP / FSDP through accelerate) need `split_step=0` (only the
single-process path is tested with a later split). Trainer checkpoints hold plain weights,
but not SD-MoE's own state (bases, shared parts, the shared optimizer): resuming them
through the Trainer restarts the method; train with `sdmoe train` for resumable SD-MoE runs. The monitor's values reach `trainer.state.log_history` and the callbacks
listed after this one (the console progress); reporting integrations (`report_to`) run
before user callbacks and do not see them unless re-added after it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import TrainerCallback

from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.errors import UserError
from sdmoe.method.config import SDMoEConfig
from sdmoe.method.controller import SDMoE
from sdmoe.method.driver import Attached, attach
from sdmoe.method.hooks import SDMoEHook


def _unwrap_optimizer(opt):
    """accelerate's AcceleratedOptimizer holds the real one as `.optimizer`."""
    while opt is not None and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _unwrap_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class _RecordBatch(SDMoEHook):
    """Forward pre-hook: keeps the last training batch's input_ids as the reference batch.

    An SDMoEHook, so `export(model)` removes it with SD-MoE's own hooks."""

    def __init__(self):
        self.batch = None

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and module.training:
            self.batch = {"input_ids": ids.detach()}


class SDMoETrainerCallback(TrainerCallback):
    """Drives an `SDMoE` controller from `transformers.Trainer`'s callback events (see module doc).

    cfg: the method's config (`split_step` counts optimizer steps, as `state.global_step`).
    monitor_every: log `spectral_snapshot` (+ the tails' overlap) every N optimizer steps (0 = off).
    monitor_rank: k of the monitor's top-k subspaces.
    reference_batch: a fixed batch (dict with input_ids, or a LongTensor) for the split's and the
        re-estimations' change measurements and data-based bases; default: the last training batch.
    clip_after_split: take the Trainer's gradient clipping over so it follows the split (default).
    """

    def __init__(self, cfg: SDMoEConfig | None = None, monitor_every: int = 0, monitor_rank: int = 8,
                 reference_batch=None, clip_after_split: bool = True):
        self.cfg = (cfg or SDMoEConfig()).validate()
        if isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 0:
            raise UserError(f"monitor_every must be an int >= 0 (0 = off), got {monitor_every!r}")
        self.monitor_every, self.monitor_rank = monitor_every, monitor_rank
        self.reference_batch = reference_batch
        self.clip_after_split = clip_after_split
        self.controller: SDMoE | None = None
        self.handle: Attached | None = None
        self.split_record: dict | None = None
        self.split_at: int | None = None
        self._model: nn.Module | None = None
        self._recorder: _RecordBatch | None = None
        self._recorder_handle = None
        self._recorder_done = False
        self._max_grad_norm: float | None = None  # the clipping we took over (None: the Trainer clips)
        self._pending: dict[str, float] = {}

    # -- set-up ------------------------------------------------------------------------
    def _bind(self, model: nn.Module) -> SDMoE:
        model = _unwrap_model(model)
        if self.controller is None:
            self._model = model
            self.controller = SDMoE(model, self.cfg)
        elif model is not self._model:
            raise UserError("this SDMoETrainerCallback already drives another model; create one per Trainer")
        return self.controller

    def _reference(self):
        if self.reference_batch is not None:
            return self.reference_batch
        return self._recorder.batch if self._recorder is not None else None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        ctl = self._bind(model)
        if self.cfg.split_step == 0 and not ctl.split_done:
            # Before the optimizer exists and before accelerate wraps the model: nothing to rebind.
            self._record_split(0, ctl.split(self.reference_batch))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        ctl = self._bind(model)
        if args.world_size > 1 and not ctl.split_done:
            raise UserError(f"SDMoETrainerCallback with {args.world_size} processes needs SDMoEConfig(split_step=0): a later "
                            "split replaces parameters under the DDP/FSDP wrapper; or train with `sdmoe train`")
        if self.clip_after_split and args.max_grad_norm and args.max_grad_norm > 0 and not args.fp16:
            self._max_grad_norm = float(args.max_grad_norm)
            args.max_grad_norm = 0.0  # the Trainer skips its clip; the driver clips after the split
        if optimizer is not None and self.handle is None:
            self.handle = attach(self._model, _unwrap_optimizer(optimizer), ctl, max_norm=self._max_grad_norm,
                                 reference_batch=self._reference, step=state.global_step)
            self.handle.on("split", self._on_split)
            self.handle.on("reestimate", self._on_reestimate)
        needs_batch = self.reference_batch is None and (not ctl.split_done or self.cfg.reestimate_every)
        if needs_batch and self._recorder_handle is None:
            self._recorder = _RecordBatch()
            self._recorder_handle = self._model.register_forward_pre_hook(self._recorder, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._max_grad_norm is not None:
            args.max_grad_norm, self._max_grad_norm = self._max_grad_norm, None
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        self._drop_recorder()

    # -- the step ------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self.handle is not None:
            # the Trainer's count: a GradScaler's skipped step moves it without an optimizer step
            self.handle.step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ctl = self.controller
        if ctl is None or not self.monitor_every or (state.global_step + 1) % self.monitor_every:
            return
        snap = spectral_snapshot(self._model, self.monitor_rank)
        self._pending.update({f"sdmoe/{k}": v for k, v in snap.items()})
        if ctl.split_done:
            self._pending.update(_flatten_monitor(ctl.monitor(self.monitor_rank)))

    def on_step_end(self, args, state, control, **kwargs):
        if self._recorder_done:
            self._drop_recorder()
        if self._pending:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs and "train_loss" not in logs:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)  # the Trainer recorded a copy before on_log
        self._pending = {}

    # -- the driver's events ---------------------------------------------------------------
    def _on_split(self, step: int, record: dict) -> None:
        self._record_split(step, record)
        # no more reference batches needed; dropped at the step's end, not inside the forward that split
        self._recorder_done = not self.cfg.reestimate_every and self.reference_batch is None

    def _on_reestimate(self, step: int, record: dict) -> None:
        self._pending["sdmoe/reestimated_at"] = float(step)
        if "logits_rel_change" in record:
            self._pending["sdmoe/reestimate_logits_rel_change"] = float(record["logits_rel_change"])

    def _record_split(self, step: int, record: dict) -> None:
        self.split_record, self.split_at = record, step
        self._pending["sdmoe/split_at"] = float(step)
        if "logits_rel_change" in record:
            self._pending["sdmoe/split_logits_rel_change"] = float(record["logits_rel_change"])

    def _drop_recorder(self) -> None:
        if self._recorder_handle is not None:
            self._recorder_handle.remove()
            self._recorder_handle = self._recorder = None
        self._recorder_done = False


def _flatten_monitor(mon: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    vals = []
    for rec in mon["layers"]:
        for p, v in rec.get("tails_overlap", {}).items():
            out[f"sdmoe/tails_overlap/L{rec['layer']}/{p}"] = float(v)
            vals.append(float(v))
        for p, v in rec.get("tracker_drift", {}).items():
            out[f"sdmoe/tracker_drift/L{rec['layer']}/{p}"] = float(v)
    if vals:
        out["sdmoe/tails_overlap/mean"] = sum(vals) / len(vals)
    return {k: v for k, v in out.items() if math.isfinite(v)}
