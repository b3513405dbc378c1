"""SD-MoE inside torchtitan (0.3): the three events as hooks, the state in torchtitan's checkpoint.

In a torchtitan config file (a function returning the Trainer's config):

    from sdmoe.integrations.torchtitan import SDMoETrainer
    from torchtitan.models.qwen3.config_registry import qwen3_30b_a3b
    from sdmoe.method import SDMoEConfig

    def qwen3_moe_sdmoe():
        return SDMoETrainer.configure(qwen3_30b_a3b(), SDMoEConfig(split_step=100))

or, in a script that builds the Trainer itself: `attach(trainer, SDMoEConfig(...))` after building it.

The hooks are `sdmoe.attach`'s, on torchtitan's OptimizersContainer, where torchtitan puts its own
MoE bias update (an optimizer step pre-hook), and on the model part:

    forward pre-hook (model)       at split_step, split and bind the optimizer
    [forward, backward; torchtitan's clip_grad_norm_, disarmed: see below]
    optimizer step pre-hook        the gradient split, then the clip
    [the optimizers' step]
    optimizer step post-hook       the shared update folded into the experts
    [the LR schedulers' step]

Clipping follows the split, as in `sdmoe train`: `attach` takes `training.max_norm` over (torchtitan
then calls its clip with an infinite norm, which leaves the gradients as they are and still logs
their norm before the split) and clips the model's and the shared parts' gradients itself.

Checkpoints: `attach` adds the state (`SDMoETorchtitan`, a Stateful) to the checkpointer's states
under "sdmoe", so torchtitan's distributed checkpoint saves and resumes it with the model, the
optimizers and the data loader. The split happens at the first forward at or after split_step, after
a resume has loaded, so a resumed run never splits twice.

Limits: one model part (no pipeline parallelism); Adam/AdamW param groups. Expert parallelism: see
docs/integrations.md.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Annotated, Any

import torch
from torch import nn

from sdmoe.errors import UserError
from sdmoe.method import SDMoEConfig, driver

try:  # the extra: pip install "sdmoe[torchtitan]"
    import tyro
    from torch.distributed.checkpoint.stateful import Stateful
    from torchtitan.trainer import Trainer
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise UserError(f"sdmoe.integrations.torchtitan needs torchtitan ({e.name} is missing); "
                    'pip install "sdmoe[torchtitan]"') from None

__all__ = ["SDMoETorchtitan", "SDMoETrainer", "attach"]

STATE_KEY = "sdmoe"


class SDMoETorchtitan(Stateful):
    """SD-MoE on a torchtitan model part, driven by `sdmoe.attach`'s hooks on its OptimizersContainer.

    model: the (single) model part; optimizers: torchtitan's OptimizersContainer (or any
    torch.optim.Optimizer that steps the experts); max_norm: the clip after the split (0 = none).
    `step` counts optimizer steps taken (torchtitan's `trainer.step` after each step)."""

    def __init__(self, model: nn.Module, optimizers: torch.optim.Optimizer, cfg: SDMoEConfig,
                 max_norm: float = 0.0):
        self.model, self.optimizers, self.cfg = model, optimizers, cfg
        self.max_norm = float(max_norm or 0.0)
        self.handle = driver.attach(model, optimizers, cfg, max_norm=self.max_norm or None)
        self.controller = self.handle.controller

    @property
    def step(self) -> int:
        return self.handle.step

    @property
    def last_norm(self) -> torch.Tensor | None:
        """The clipped vector's norm (model + shared parts) of the last step."""
        return self.handle.grad_norm

    def host_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps the experts (one of the container's `optimizers`)."""
        return self.handle.host_optimizer()

    def remove(self) -> None:
        """Remove the hooks (the controller stays; `sdmoe.export(model)` ends it)."""
        self.handle.detach()

    # -- Stateful, for torchtitan's checkpointer -----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """One bytes value: the state's structure differs before and after the split, and a distributed
        checkpoint loads only the keys its template has; the state is the same on every rank."""
        buf = io.BytesIO()
        torch.save({"step": self.step, "controller": self.controller.state_dict()}, buf)
        return {"state": buf.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = torch.load(io.BytesIO(state_dict["state"]), weights_only=True)
        if self.controller.split_done:
            raise UserError("SD-MoE state loaded after the split; load the checkpoint before the first training "
                            "forward (torchtitan's Trainer.train() does)")
        # the optimizers' own state is loaded by the same checkpoint: keep the experts' moments
        self.handle.load_state_dict({**sd["controller"], "step": int(sd["step"])}, optimizer_loaded=True)


def attach(trainer: Trainer, cfg: SDMoEConfig) -> SDMoETorchtitan:
    """SD-MoE on a built torchtitan Trainer: hooks on its optimizers, its clip taken over, the state
    in its checkpointer. Call before `trainer.train()`."""
    if len(trainer.model_parts) != 1:
        raise UserError(f"SD-MoE with torchtitan drives one model part, got {len(trainer.model_parts)} (pipeline "
                        "parallelism); set parallelism.pipeline_parallel_degree=1")
    training = trainer.config.training
    max_norm = training.max_norm if math.isfinite(training.max_norm) else 0.0
    sd = SDMoETorchtitan(trainer.model_parts[0], trainer.optimizers, cfg, max_norm)
    training.max_norm = math.inf  # torchtitan's clip before the split leaves the gradients alone
    trainer.checkpointer.states[STATE_KEY] = sd
    return sd


class SDMoETrainer(Trainer):
    """torchtitan's Trainer with SD-MoE attached; its config is the Trainer's plus `sdmoe`."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        # set in the config file, not on the command line (tyro cannot parse the method's settings)
        sdmoe: Annotated[SDMoEConfig, tyro.conf.Suppress] = dataclasses.field(default_factory=SDMoEConfig)

    def __init__(self, config: Config):
        super().__init__(config)
        self.sdmoe = attach(self, config.sdmoe)

    @classmethod
    def configure(cls, config: Trainer.Config, sdmoe: SDMoEConfig) -> SDMoETrainer.Config:
        """An existing Trainer config (e.g. a model's registered one) with SD-MoE on."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
        return cls.Config(**fields, sdmoe=sdmoe)
