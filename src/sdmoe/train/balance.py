"""Expert load: what every router decided this step, and load balancing.

Router forward hooks record the chosen experts (transformers 5 routers return
`(logits, scores, indices)`). From those counts the loop logs per-layer load,
and for routers with a score-correction bias (DeepSeek-V3) applies the
aux-loss-free update `bias += rate * sign(mean_load - load)`. Styles whose
host model computes no auxiliary loss and has no bias (DeepSeek-V2 here) get
transformers' own Switch-style `load_balancing_loss_func` on the recorded
logits.
"""

from __future__ import annotations

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from sdmoe.moe import MoEBlock
from sdmoe.remedies.balance import GlobalBatchBalance


class LoadTracker:
    def __init__(self, blocks: list[MoEBlock], top_k: int, reduce=None):
        self.blocks = blocks
        # Sums the step's counts over data-parallel ranks, so every rank's
        # bias update sees the global load.
        self.reduce = reduce or (lambda t: t)
        self.top_k = top_k
        self.step_LE = torch.zeros(len(blocks), blocks[0].num_experts, device=blocks[0].router.weight.device)
        self.window_LE = torch.zeros_like(self.step_LE)
        self.logits: list[torch.Tensor] = []
        self._handles = [b.router.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, i: int):
        def record(module, args, output):
            if not torch.is_grad_enabled():  # evaluation passes do not count as load
                return
            logits, indices = output[0], output[2]
            self.logits.append(logits)
            self.step_LE[i] += torch.bincount(indices.reshape(-1), minlength=self.step_LE.shape[1]).to(self.step_LE)

        return record

    def aux_loss(self, coef: float, logits: list[torch.Tensor]) -> torch.Tensor | None:
        """Switch-style balance loss for hosts that compute none themselves."""
        if not logits or coef == 0:
            return None
        return coef * load_balancing_loss_func(tuple(logits), self.step_LE.shape[1], self.top_k)

    def balance_loss(self, host_aux: torch.Tensor | None, coef: float,
                     global_batch: GlobalBatchBalance | None = None) -> torch.Tensor | None:
        """The micro-batch's balance loss (the logits its forward recorded, then cleared): none where a router
        bias balances the load (DeepSeek-V3); the global-batch loss where asked (`global_batch`); else the
        host's own auxiliary loss where it computes one (`host_aux`), or the Switch loss on the logits."""
        logits, self.logits = self.logits, []
        if self.has_bias():
            return None
        if global_batch is not None:
            return None if coef == 0 else coef * global_batch.loss(logits)
        return coef * host_aux if host_aux is not None else self.aux_loss(coef, logits)

    def has_bias(self) -> bool:
        return any(getattr(b.router, "e_score_correction_bias", None) is not None for b in self.blocks)

    @torch.no_grad()
    def end_step(self, bias_rate: float) -> None:
        """Apply DeepSeek-V3's aux-loss-free bias update from this step's load; start the next step."""
        self.step_LE = self.reduce(self.step_LE)
        for block, load in zip(self.blocks, self.step_LE):
            bias = getattr(block.router, "e_score_correction_bias", None)
            if bias is not None and bias_rate > 0:
                bias += bias_rate * torch.sign(load.mean() - load).to(bias)
        self.window_LE += self.step_LE
        self.step_LE.zero_()
        self.logits = []

    def take_window(self) -> torch.Tensor:
        """Token shares per layer and expert since the last call (rows sum to 1)."""
        shares = self.window_LE / self.window_LE.sum(dim=1, keepdim=True).clamp_min(1)
        self.window_LE = torch.zeros_like(self.window_LE)
        return shares

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
