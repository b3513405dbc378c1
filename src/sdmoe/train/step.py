"""One optimizer step of `sdmoe train`: forward, loss and balance loss, backward, `optimizer.step()`.

Everything SD-MoE, clipping, the non-finite policy and the load tracker's bias update do
runs in the optimizer step's hooks (`sdmoe.attach`), so the step reads as a plain PyTorch
one. The timing processes of a compare (`sdmoe.experiments.timing`) time this very object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sdmoe.device import autocast as device_autocast
from sdmoe.eval.perplexity import causal_lm_loss
from sdmoe.method.driver import attach
from sdmoe.models import build_model
from sdmoe.models.pretrained import load_init_model
from sdmoe.moe import find_moe_blocks
from sdmoe.train.balance import LoadTracker
from sdmoe.train.config import RunConfig

# styles whose transformers model computes no auxiliary loss of its own (the load tracker balances them)
NO_HOST_AUX = ("deepseek_v2", "deepseek_v3")


@dataclass
class StepLosses:
    lm: torch.Tensor  # the language-model loss (0-dim, on the device: reading it waits for the step)
    balance: torch.Tensor | None  # the load-balancing loss added to it, if any


def start_model(cfg: RunConfig, tokenizer, device) -> nn.Module:
    """The model a run starts from: the `--init` checkpoint's (`cfg.init`), or a new one built from `cfg.model`."""
    if cfg.init:
        return load_init_model(cfg.init, device)
    return build_model(cfg.model, len(tokenizer), seed=cfg.loop.seed, eos_token_id=tokenizer.eos_token_id,
                       device=device)


class TrainStep:
    """`cfg`'s training step on `model` and `optimizer`; `engine` (default the model) runs the forward: DDP's
    wrapper of it, or the FSDP2-sharded model. `reduce` sums the expert loads over data-parallel ranks."""

    def __init__(self, cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 reference_batch=None, reduce=None):
        self.cfg, self.model, self.engine, self.optimizer = cfg, model, model, optimizer
        self.handle = attach(model, optimizer, cfg.sdmoe if cfg.method == "sd-moe" else None,
                             max_norm=cfg.optim.grad_clip, reference_batch=reference_batch,
                             nan_policy=cfg.loop.nan_policy)
        self.loads = LoadTracker(find_moe_blocks(model), cfg.model.top_k, reduce=reduce)
        rate = cfg.optim.bias_update_rate
        # DeepSeek-V3's aux-loss-free bias update after every step (none after a dropped one)
        self.handle.on("step", lambda step, skipped: self.loads.end_step(0.0 if skipped else rate))
        self.host_aux = cfg.model.style not in NO_HOST_AUX
        self.autocast = device_autocast(cfg.loop.precision, device)  # bf16 on CUDA by default, float32 on the CPU

    def __call__(self, input_ids: torch.Tensor) -> StepLosses:
        with self.autocast:
            out = self.engine(input_ids=input_ids)
            lm_loss = causal_lm_loss(out.logits, input_ids)
            balance = self.loads.balance_loss(getattr(out, "aux_loss", None) if self.host_aux else None, self.cfg.model.aux_loss_coef)
            loss = lm_loss if balance is None else lm_loss + balance
        loss.backward()
        self.optimizer.step()  # hooks: the SD-MoE split, the clip, the shared update, the bias update
        return StepLosses(lm_loss, balance)

    def close(self) -> None:
        """Remove the hooks (the driver's and the load tracker's)."""
        self.handle.detach()
        self.loads.remove()
