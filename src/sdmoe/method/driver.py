"""`sdmoe.attach`: SD-MoE driven by hooks on the optimizer and the model, so a training loop stays plain PyTorch.

    handle = sdmoe.attach(model, optimizer, sdmoe.SDMoEConfig(split_step=100), max_norm=1.0)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()           # the split, the clip, the shared update: all in the step's hooks
        optimizer.zero_grad()
    sdmoe.export(model)            # a plain model again, ready for save_pretrained

What runs where, each step (torchtitan attaches its own MoE bias update the same way,
with `register_step_pre_hook` on the optimizer):

    model forward pre-hook     `before_forward`: at split_step, split and bind the optimizer;
                               collection windows before it (training forwards only)
    optimizer step pre-hook    the non-finite policy (nan_policy="skip"), then `after_backward`
                               (the gradient split), then the clip of the model's and the shared
                               parts' gradients together (max_norm)
    [the optimizer's own step]
    optimizer step post-hook   `after_optimizer_step`: the shared update folded into the experts,
                               refreshes, re-estimations; then the "step" listeners (a load
                               tracker's bias update)

`cfg=None` drives no SD-MoE: the same clip, non-finite policy and listeners, so the baseline of a
paired comparison runs the very same loop. `cfg` may also be an `SDMoE` already built (and split)
elsewhere, as the Trainer callback's split at `on_init_end` is.

The handle is found from the model (`hooks.attached`: its `DriverHook`), so `sdmoe.export(model)`
detaches it and a second `attach` on the same model is refused, with nothing kept outside the model.

torch.compile. `model` may be compiled before `attach` (an `OptimizedModule`: the driver works on the module
under it) or after; blocks compiled one by one (torchtitan's way) never see the model's hook. The forward
pre-hook is excluded from dynamo (`torch.compiler.disable`): the split and the windows run eagerly, at a graph
break before the compiled forward; the optimizer hooks run outside any compiled forward anyway.

The handle counts the optimizer steps it saw (`step`, skipped ones included); a caller whose own
counter may move without an optimizer step (a GradScaler that skipped one) sets `handle.step`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe.sharding import clip_, local, total_norm

from .config import SDMoEConfig
from .controller import SDMoE
from .export import export
from .hooks import DriverHook, attached, uncompiled

# "stop": every step applies, whatever its gradients (no host sync); the caller stops the run on a non-finite
# `grad_norm`, as `sdmoe train` does (loop.nan_policy). "skip": a step whose gradients are not finite is dropped.
NanPolicy = Literal["stop", "skip"]
EVENTS = ("split", "reestimate", "step")


class Attached:
    """The handle `attach` returns: the hooks, the controller, the last step's norm and what happened."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: SDMoEConfig | SDMoE | None,
                 max_norm: float | None = None, reference_batch=None, nan_policy: NanPolicy = "stop", step: int = 0):
        if nan_policy not in ("stop", "skip"):
            raise UserError(f"nan_policy={nan_policy!r}: use 'stop' (every step applies; stop on a non-finite "
                            "grad_norm) or 'skip' (drop a step whose gradient norm is not finite)")
        if max_norm is not None and not max_norm > 0:
            raise UserError(f"max_norm={max_norm!r}: give a positive norm to clip to, or None for no clipping")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"sdmoe.attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        model = uncompiled(model)  # torch.compile's wrapper: drive the module under it, with eager names
        if attached(model) is not None:
            raise UserError("this model is already attached to an optimizer; use that handle, or call its detach() "
                            "(or sdmoe.export(model)) before attaching again")
        self.model, self.optimizer = model, optimizer
        self.controller = cfg if isinstance(cfg, SDMoE) or cfg is None else SDMoE(model, cfg)
        if self.controller is not None and self.controller.model is not model:
            raise UserError("the SDMoE passed to attach drives another model; attach it to its own model")
        self.max_norm, self.nan_policy = max_norm, nan_policy
        self.reference_batch = reference_batch
        self.step = step
        self.grad_norm: torch.Tensor | None = None  # the last step's total norm (0-dim, on the device)
        self.skipped = False  # whether the last step was dropped (nan_policy="skip")
        self.nonfinite_grad: str | None = None  # the first non-finite gradient of the last dropped step
        self._listeners: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self._splitting = False
        if self.controller is not None and self.controller.split_done:  # split already: bind now (once per optimizer)
            self.controller.bind_optimizer(self.host_optimizer())
        # last: a refusal above leaves no hook behind.
        # torch.compile(model), before or after this, traces the model's hooks into its graph (dynamo inlines
        # Module._call_impl). The split and the windows must run eagerly: they build tensors, an optimizer and
        # hooks, and an optimizer built under tracing comes out `capturable`, which the CPU refuses at the first
        # step. Disabling dynamo on this one hook (recursively: the split's own forwards too) is the narrowest
        # cut: one graph break before the forward, which compiles as it would without SD-MoE; the hook stays
        # registered all run, so its presence never changes and never recompiles the model. (The wrapper's
        # `__wrapped__` is the DriverHook: `hooks.attached` finds the handle through it.)
        self._handles = [model.register_forward_pre_hook(torch.compiler.disable(DriverHook(self))),
                         optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    # -- listeners -----------------------------------------------------------------------------
    def on(self, event: str, fn: Callable) -> None:
        """Call fn(step, record) after a split or a re-estimation, fn(step, skipped) after every optimizer step."""
        if event not in EVENTS:
            raise UserError(f"unknown event {event!r}; listen to one of {', '.join(EVENTS)}")
        self._listeners[event].append(fn)

    def _tell(self, event: str, *args) -> None:
        for fn in self._listeners[event]:
            fn(self.step, *args)

    # -- the hooks -------------------------------------------------------------------------------
    def on_forward(self, module, args) -> None:
        """The model's forward pre-hook (`hooks.DriverHook`): the split when due, the collection windows."""
        # idempotent: several forwards a step (gradient accumulation) are fine; the split's own forwards on the
        # reference batch come back here while it runs, and pass
        if module.training and torch.is_grad_enabled() and self.controller is not None and not self._splitting:
            if not self.controller.split_done:
                self._split_if_due()

    def _split_if_due(self) -> dict | None:
        ctl = self.controller
        host = self.host_optimizer() if self.step >= ctl.cfg.split_step else None
        self._splitting = True
        try:
            record = ctl.before_forward(self.step, host, self._reference())
        finally:
            self._splitting = False
        if record is not None:
            self._tell("split", record)
        return record

    def split(self) -> dict | None:
        """Split now and bind the optimizer (what the forward hook does at split_step): for a model that must
        be split before it is wrapped (FSDP2 shards the split model). Returns the split record; None when
        there is nothing to split (no SD-MoE, or a model split already, a resumed run's)."""
        ctl = self.controller
        if ctl is None or ctl.split_done:
            return None
        if self.step < ctl.cfg.split_step:
            raise UserError(f"split() at step {self.step}, before sdmoe.split_step={ctl.cfg.split_step}; set "
                            "split_step=0 to split before training")
        return self._split_if_due()

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self.skipped, self.nonfinite_grad = False, None
        if self.nan_policy == "skip":
            # Decided on the whole gradients, before the split: the tracker updates its basis in place from
            # them, and one NaN step would poison every later one. One host sync a step, in skip mode only.
            norm = total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            if not torch.isfinite(norm):
                self.grad_norm, self.nonfinite_grad, self.skipped = norm, first_nonfinite_grad(self.model), True
                for p in self._all_parameters():
                    p.grad = None  # the optimizers skip parameters without gradients: the step does nothing
                return
        if self.controller is not None:
            self.controller.after_backward(self.step)  # the split, before the clip sees the gradients
        if self.max_norm is not None:
            self.grad_norm = self._clip(self.max_norm)

    def _after_step(self, optimizer, args, kwargs) -> None:
        ctl = self.controller
        if ctl is not None and ctl.split_done and not self.skipped:
            if (record := ctl.after_optimizer_step(self.step, self._reference())) is not None:
                self._tell("reestimate", record)
        self._tell("step", self.skipped)
        self.step += 1

    def _clip(self, max_norm: float) -> torch.Tensor:
        if self.controller is not None:
            return self.controller.clip_grad_norm_(max_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = total_norm(grads)  # torch's clip_grad_norm_, for gradients on several meshes too (EP x FSDP2)
        clip_(grads, max_norm, norm)
        return norm

    def _all_parameters(self) -> list[nn.Parameter]:
        extra = self.controller.parameters() if self.controller is not None else []
        return [*self.model.parameters(), *extra]

    def _reference(self):
        ref = self.reference_batch
        return ref() if callable(ref) else ref

    # -- the optimizer that steps the experts --------------------------------------------------
    def host_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps the experts: the one attached to, or one of a container's
        `optimizers` (torchtitan's OptimizersContainer holds one per model part)."""
        inner = getattr(self.optimizer, "optimizers", None) or [self.optimizer]
        experts = {id(p) for b in self.controller.blocks for p in b.host_parameters()}
        for opt in inner:
            if any(id(p) in experts for g in opt.param_groups for p in g["params"]):
                return opt
        raise UserError("the optimizer holds none of the experts' weights; build it from model.parameters() of "
                        "the model SD-MoE was attached to")

    # -- state, export, detach ------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """The controller's state (`SDMoE.state_dict`) and the step count; None without SD-MoE."""
        if self.controller is None:
            return None
        return {**self.controller.state_dict(), "step": self.step}

    def load_state_dict(self, sd: Mapping | None, optimizer_loaded: bool = False) -> None:
        """Restore `state_dict()` on a fresh model; load the host optimizer's own state after this, or pass
        optimizer_loaded=True when it already holds its checkpointed state (the experts' moments are kept)."""
        if sd is None or self.controller is None:
            return
        if "step" in sd:
            self.step = int(sd["step"])
        host = self.host_optimizer() if sd.get("split_done") else None
        self.controller.load_state_dict(sd, host, optimizer_loaded=optimizer_loaded)

    def export(self, target: nn.Module | None = None) -> nn.Module:
        """`sdmoe.export(self.model)` (the one documented way), for callers holding the handle; `target`, an
        unsharded copy of an FSDP2 model, is exported too and returned."""
        plain = export(self.model)
        return plain if target is None else export(target)

    def detach(self) -> None:
        """Remove the driver's hooks (the controller and the model's state stay as they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: SDMoEConfig | SDMoE | None,
           max_norm: float | None = None, *, reference_batch=None, nan_policy: NanPolicy = "stop",
           step: int = 0) -> Attached:
    """SD-MoE on `model`, driven by hooks on `optimizer`'s step and the model's forward (see the module doc).

    max_norm: clip the model's and the shared parts' gradients together to it, after the split (None: no clip).
    reference_batch: a batch (LongTensor, or a dict of model inputs), or a function returning one, for the
        split's change measurement and data-based bases.
    nan_policy: "stop" applies every step whatever its gradients (no host sync): the caller stops on a
        non-finite `handle.grad_norm`, as `sdmoe train` does; "skip" drops a step whose gradient norm is not
        finite (one more norm and one host sync a step): no weight, moment, basis or shared part changes,
        and the step still counts. The same two words as `sdmoe train`'s `loop.nan_policy`.
    step: the optimizer steps already taken (a resumed run's)."""
    return Attached(model, optimizer, cfg, max_norm, reference_batch, nan_policy, step)


def first_nonfinite_grad(model: nn.Module) -> str:
    """The name of the model's first parameter whose gradient holds a NaN or Inf (this rank's shard under FSDP2)."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(local(p.grad)).all():
            return name
    return "none (the loss itself)"
