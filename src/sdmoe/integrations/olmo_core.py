"""SD-MoE inside OLMo-core (3.0), as one trainer callback.

    from sdmoe.integrations.olmo_core import SDMoEOlmoCoreCallback
    from sdmoe.method import SDMoEConfig
    trainer_config = trainer_config.with_callback("sdmoe", SDMoEOlmoCoreCallback(cfg=SDMoEConfig(split_step=100)))

The model stays OLMo-core's own Transformer (its MoE blocks' `experts.mlp.w1/w2/w3` are the experts'
weights); SD-MoE runs in `sdmoe.attach`'s hooks on `train_module.optim` and the model, which the
callback sets up from OLMo-core's callback events:

    pre_train        `sdmoe.attach` on `train_module.model` and `train_module.optim`; the clipping taken
                     over; a resume's SD-MoE state (loaded before pre_train) is applied here
    pre_step         the driver's step count follows the trainer's
    [forward: at split_step the driver splits and binds the optimizer; backward]
    pre_optim_step   the spectral monitor when due
    [train_module.optim_step: LR schedule; optimizer.step(), whose hooks split the gradients, clip,
     and fold the shared update into the experts]
    post_train_batch the clipped norm recorded as "optim/total grad norm"; the checkpointer's
                     post_train_batch (priority 1) runs after this callback's (10) and so after the fold

Steps: OLMo-core's `global_step` counts from 1 and is incremented before `pre_step`; the controller's
steps count from 0 (`global_step - 1`), so split_step=100 splits before OLMo-core's step 101.

Clipping follows the split, as in `sdmoe train`: at pre_train the callback stores the train module's
`max_grad_norm`, sets it to None (restored at post_train) and gives it to the driver, which clips the
model's and the shared parts' gradients after the split; the norm is recorded as OLMo-core would.

Checkpoints: OLMo-core saves each callback's `state_dict()` with the trainer state (train/rank*.pt)
and loads the model and optimizer before the callbacks' state, so the callback binds the loaded
optimizer without resetting the experts' moments.

Limits: torch optimizers (`AdamWConfig`, `AdamConfig`; not the SkipStep ones, whose skip decision
the shared optimizer would not see). OLMo-core's MoE forward needs its Triton
kernels (a GPU); on CPU only the expert MLPs and the router run (the tests do that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.errors import UserError
from sdmoe.method import SDMoE, SDMoEConfig
from sdmoe.method.driver import Attached, attach

try:  # the extra: pip install "sdmoe[olmo-core]"
    from olmo_core.optim.skip_step_optimizer import SkipStepOptimizer
    from olmo_core.train.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise UserError(f"sdmoe.integrations.olmo_core needs OLMo-core ({e.name} is missing); "
                    'pip install "sdmoe[olmo-core]"') from None

__all__ = ["SDMoEOlmoCoreCallback"]


@dataclass
class SDMoEOlmoCoreCallback(Callback):
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
        self.handle: Attached | None = None
        self.split_record: dict | None = None
        self._pending_state: dict | None = None
        self._max_grad_norm: float | None = None

    @property
    def controller(self) -> SDMoE | None:
        return None if self.handle is None else self.handle.controller

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
        if self.clip_after_split and getattr(tm, "max_grad_norm", None):
            self._max_grad_norm, tm.max_grad_norm = float(tm.max_grad_norm), None
        if self.handle is None:
            # the controller's steps count from 0: OLMo-core's global_step counts the steps already taken
            self.handle = attach(tm.model, self._optim(), self.cfg, max_norm=self._max_grad_norm, step=self.step)
            self.handle.on("split", self._on_split)
        if self._pending_state is not None:
            sd, self._pending_state = self._pending_state, None
            self.handle.load_state_dict(sd, optimizer_loaded=True)  # the optimizer's state is loaded already

    def post_train(self):
        if self._max_grad_norm is not None:
            self._train_module.max_grad_norm, self._max_grad_norm = self._max_grad_norm, None

    # -- the step ------------------------------------------------------------------------------
    def pre_step(self, batch: dict[str, Any]):
        if self.handle is not None:
            self.handle.step = self.step - 1  # global_step is incremented before pre_step

    def _on_split(self, step: int, record: dict) -> None:
        self.split_record = record
        self.trainer.record_metric("split_at", float(step), namespace="sdmoe")

    def pre_optim_step(self):
        if self.handle is not None and self.monitor_every and self.step % self.monitor_every == 0:
            for k, v in spectral_snapshot(self.handle.model, self.monitor_rank).items():
                self.trainer.record_metric(k, v, namespace="sdmoe")

    def post_train_batch(self):
        if self.handle is not None and self._max_grad_norm is not None and self.handle.grad_norm is not None:
            self.trainer.record_metric("total grad norm", self.handle.grad_norm, reduce_type=None, namespace="optim")

    # -- checkpoints: OLMo-core saves this with the trainer state ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]):
        # called before pre_train, after the model's and optimizer's state are loaded
        self._pending_state = state_dict.get("controller")
