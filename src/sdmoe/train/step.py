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
from sdmoe.errors import UserError
from sdmoe.eval.perplexity import causal_lm_loss
from sdmoe.method.driver import attach
from sdmoe.models import build_model
from sdmoe.models.pretrained import load_init_model
from sdmoe.moe import find_moe_blocks
from sdmoe.remedies.balance import GlobalBatchBalance
from sdmoe.remedies.specialisation import SpecialisationLosses
from sdmoe.train.balance import LoadTracker
from sdmoe.train.config import RunConfig

# styles whose transformers model computes no auxiliary loss of its own (the load tracker balances them)
NO_HOST_AUX = ("deepseek_v2", "deepseek_v3")


@dataclass
class StepLosses:
    lm: torch.Tensor  # the language-model loss (0-dim, on the device: reading it waits for the step)
    balance: torch.Tensor | None  # the load-balancing loss added to it, if any
    aux: torch.Tensor | None = None  # Guo et al.'s terms added to it (aux.orthogonality, aux.variance), if any


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
        # the other remedies (sdmoe.remedies): the balance counted over the global batch, Guo et al.'s terms
        self.global_batch = self._global_batch(cfg, reduce)
        aux = cfg.aux
        self.specialise = (SpecialisationLosses(model, aux.orthogonality, aux.variance)
                           if aux.orthogonality or aux.variance else None)

    def _global_batch(self, cfg: RunConfig, reduce) -> GlobalBatchBalance | None:
        if cfg.aux.balance != "global_batch":
            return None
        if self.loads.has_bias():
            raise UserError("aux.balance=global_batch changes where the Switch balance loss counts, and this "
                            "model balances with a router bias instead; set aux.balance=micro_batch")
        global_batch = GlobalBatchBalance(self.loads.step_LE.shape[1], self.loads.top_k, reduce=reduce)
        self.handle.on("step", lambda step, skipped: global_batch.end_step())
        return global_batch

    def __call__(self, input_ids: torch.Tensor) -> StepLosses:
        """One optimizer step over `input_ids` (this process's rows), in loop.micro_batches forward/backward
        passes whose gradients add up to the whole batch's mean loss."""
        micro = self.cfg.loop.micro_batches
        lm_total, balance_total, aux_total = None, None, None
        for ids in input_ids.chunk(micro) if micro > 1 else (input_ids,):
            with self.autocast:
                out = self.engine(input_ids=ids)
                lm_loss = causal_lm_loss(out.logits, ids)
                host_aux = getattr(out, "aux_loss", None) if self.host_aux else None
                balance = self.loads.balance_loss(host_aux, self.cfg.model.aux_loss_coef, self.global_batch)
                aux = self.specialise.loss() if self.specialise is not None else None
                loss = sum((x for x in (balance, aux) if x is not None), lm_loss)
            (loss / micro if micro > 1 else loss).backward()
            lm_total, balance_total, aux_total = _add(lm_total, lm_loss), _add(balance_total, balance), _add(aux_total, aux)
        self.optimizer.step()  # hooks: the SD-MoE split, the clip, the shared update, the bias update
        if micro > 1:
            lm_total, balance_total, aux_total = (None if x is None else x.detach() / micro
                                                  for x in (lm_total, balance_total, aux_total))
        return StepLosses(lm_total, balance_total, aux_total)

    def state_dict(self) -> dict:
        """What a resumed run needs beside the model, optimizer and SD-MoE: Guo et al.'s calibrated weights."""
        return {"specialise": self.specialise.state_dict()} if self.specialise is not None else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.specialise is not None:
            self.specialise.load_state_dict((state or {}).get("specialise"))

    def close(self) -> None:
        """Remove the hooks (the driver's, the load tracker's, the specialisation terms')."""
        self.handle.detach()
        self.loads.remove()
        if self.specialise is not None:
            self.specialise.remove()


def _add(total: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    """The micro-batches' sum of a loss term, detached (None while the term is absent)."""
    if x is None:
        return total
    return x.detach() if total is None else total + x.detach()
