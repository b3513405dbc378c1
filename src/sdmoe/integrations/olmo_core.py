"""SD-MoE inside OLMo-core (3.0), as one trainer callback.

    from sdmoe.integrations.olmo_core import SDMoECallback
    from sdmoe.method import SDMoEConfig
    trainer_config = trainer_config.with_callback("sdmoe", SDMoECallback(cfg=SDMoEConfig(split_step=100)))

The model stays OLMo-core's own Transformer (its MoE blocks' `experts.mlp.w1/w2/w3` are the experts'
weights); the callback calls the controller's three events from OLMo-core's callback events:

    pre_train        build the controller on `train_module.model`; take the clipping over;
                     a resume's SD-MoE state (loaded before pre_train) is applied here
    pre_step         `before_forward`: at split_step, split and bind `train_module.optim`
    [forward, backward: train_module.train_batch]
    pre_optim_step   `after_backward` (the gradient split), then the clip, then the monitor when due
    [train_module.optim_step: LR schedule, optimizer step]
    post_train_batch `after_optimizer_step`: the shared update folded into the experts. The callback's
                     priority (10) runs it before the checkpointer's post_train_batch (priority 1),
                     so a checkpoint holds the folded weights.

Steps: OLMo-core's `global_step` counts from 1 and is incremented before `pre_step`; the controller's
steps count from 0 (`global_step - 1`), so split_step=100 splits before OLMo-core's step 101.

Clipping follows the split, as in `sdmoe train`: at pre_train the callback stores the train module's
`max_grad_norm`, sets it to None (restored at post_train) and clips the model's and the shared parts'
gradients itself, recording "optim/total grad norm" as OLMo-core would.

Checkpoints: OLMo-core saves each callback's `state_dict()` with the trainer state (train/rank*.pt)
and loads the model and optimizer before the callbacks' state, so the callback binds the loaded
optimizer without resetting the experts' moments.

Limits: torch optimizers (`AdamWConfig`, `AdamConfig`; not the SkipStep ones, whose skip decision
the shared optimizer would not see); lr_tail_mult = 1. OLMo-core's MoE forward needs its Triton
kernels (a GPU); on CPU only the expert MLPs and the router run (the tests do that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.errors import UserError
from sdmoe.method import SDMoE, SDMoEConfig

try:  # the extra: pip install "sdmoe[olmo-core]"
    from olmo_core.optim.skip_step_optimizer import SkipStepOptimizer
    from olmo_core.train.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise UserError(f"sdmoe.integrations.olmo_core needs OLMo-core ({e.name} is missing); "
                    'pip install "sdmoe[olmo-core]"') from None

__all__ = ["SDMoECallback"]


@dataclass
class SDMoECallback(Callback):
    """Drives an `SDMoE` controller from OLMo-core's trainer (see the module doc).

    cfg: the method's config (`split_step` counts optimizer steps from 0).
    monitor_every: record `spectral_snapshot` (+ the tails' overlap) every N steps (0 = off).
    clip_after_split: take the train module's gradient clipping over so it follows the split."""

    priority: ClassVar[int] = 10  # before the checkpointer (1): it saves the folded weights

    cfg: SDMoEConfig = field(default_factory=SDMoEConfig)
    monitor_every: int = 0
    monitor_rank: int = 8
    clip_after_split: bool = True

    def __post_init__(self):
        self.cfg.validate()
        if self.cfg.lr_tail_mult != 1.0:
            raise UserError(f"lr_tail_mult={self.cfg.lr_tail_mult} with OLMo-core: set lr_tail_mult=1 (a separate "
                            "tails' rate adds a param group OLMo-core's optimizer checkpoints do not know)")
        self.controller: SDMoE | None = None
        self.split_record: dict | None = None
        self._pending_state: dict | None = None
        self._max_grad_norm: float | None = None

    # -- set-up -----------------------------------------------------------------------------
    @property
    def _train_module(self):
        return self.trainer.train_module

    def _optim(self) -> torch.optim.Optimizer:
        optim = self._train_module.optim
        if isinstance(optim, SkipStepOptimizer) or not isinstance(optim, torch.optim.Optimizer):
            raise UserError(f"SD-MoE needs a torch optimizer, got {type(optim).__name__}; use AdamWConfig (not "
                            "SkipStepAdamWConfig): the shared part's optimizer cannot see the skip decision")
        return optim

    def pre_train(self):
        tm = self._train_module
        if self.controller is None:
            self.controller = SDMoE(tm.model, self.cfg)
        if self._pending_state is not None:
            sd, self._pending_state = self._pending_state, None
            split = sd.get("split_done")
            self.controller.load_state_dict(sd, self._optim() if split else None, optimizer_loaded=True)
        if self.clip_after_split and getattr(tm, "max_grad_norm", None):
            self._max_grad_norm, tm.max_grad_norm = float(tm.max_grad_norm), None

    def post_train(self):
        if self._max_grad_norm is not None:
            self._train_module.max_grad_norm, self._max_grad_norm = self._max_grad_norm, None

    # -- the step ------------------------------------------------------------------------------
    def pre_step(self, batch: dict[str, Any]):
        ctl = self.controller
        if ctl is None or ctl.split_done:
            return
        step = self.step - 1
        record = ctl.before_forward(step, self._optim() if step >= self.cfg.split_step else None)
        if record is not None:
            self.split_record = record
            self.trainer.record_metric("split_at", float(step), namespace="sdmoe")

    def pre_optim_step(self):
        ctl = self.controller
        if ctl is None:
            return
        step = self.step - 1
        ctl.after_backward(step)
        if self._max_grad_norm is not None:
            norm = ctl.clip_grad_norm_(self._max_grad_norm)
            self.trainer.record_metric("total grad norm", norm, reduce_type=None, namespace="optim")
        if self.monitor_every and self.step % self.monitor_every == 0:
            for k, v in spectral_snapshot(ctl.model, self.monitor_rank).items():
                self.trainer.record_metric(k, v, namespace="sdmoe")

    def post_train_batch(self):
        ctl = self.controller
        if ctl is not None and ctl.split_done:
            ctl.after_optimizer_step(self.step - 1)

    # -- checkpoints: OLMo-core saves this with the trainer state ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]):
        # called before pre_train, after the model's and optimizer's state are loaded
        self._pending_state = state_dict.get("controller")
