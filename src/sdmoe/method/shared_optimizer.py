"""The shared parts' optimizer: its own parameter group's rate, its step, and its fold into every expert.

Why this is the same method as W_i = C + T_i with C and T_i as parameters: AdamW is
elementwise and its weight decay is linear, so the tails' update is AdamW on the tails'
gradients applied to W_i, and the shared part's update is AdamW on the shared gradient
applied to a parameter that starts every step at zero (the "delta" of each shared part).
The one difference, the weight decay of C at the shared learning rate instead of the tails',
is added back here (zero when the two rates are equal). Like the tails of a fresh
parameter, the experts' optimizer state is reset at the split.

Rates: the tails train at the rate of the host optimizer's group that holds the experts;
the shared part at the base rate (that group's rate over its `lr_mult`) times `lr_shared_mult`.
Both are read from the host's group at every step, so whatever schedule the host's loop
applies to its groups applies to both.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from sdmoe.errors import UserError

from . import core
from .layer import LayerState


def base_rate(group: Mapping) -> float:
    """A group's rate over its multiplier: the schedule's base rate (a group with lr_mult 0: its own rate)."""
    return float(group["lr"]) / (group.get("lr_mult", 1.0) or 1.0)


class SharedOptimizer:
    """The host optimizer's class and settings over the shared deltas, and the host group they follow."""

    def __init__(self, host: torch.optim.Optimizer, layers: list[LayerState], shared_mult: float,
                 reset_state: bool = True):
        """Bind `host` (after the split): reset the experts' optimizer state (fresh moments for the tails)
        and build the shared optimizer (the host's class and settings, no weight decay: it is applied to C
        in `step`).

        reset_state=False keeps the experts' moments: a resume whose host loads the optimizer's state
        before SD-MoE's (OLMo-core, torchtitan) binds an optimizer that already holds the tails' moments."""
        self.host, self.layers, self.shared_mult = host, layers, shared_mult
        experts = {id(p): p for layer in layers for p in layer.block.host_parameters(layer.projs)}
        index = next((i for i, g in enumerate(host.param_groups) if any(id(p) in experts for p in g["params"])), None)
        if index is None:
            raise UserError("the optimizer holds none of the experts' weights; build it from model.parameters()")
        for p in experts.values() if reset_state else ():
            host.state.pop(p, None)
        # indices, not the dicts: Optimizer.load_state_dict replaces the group dicts, and FSDP2 sharding
        # replaces the parameters
        self.index = index
        self.optimizer = _like(host, index, self.parameters())

    def parameters(self) -> list[nn.Parameter]:
        return [layer.delta[p] for layer in self.layers for p in layer.projs]

    def rates(self) -> tuple[float, float, float]:
        """(the tails' rate, the shared part's rate, the weight decay), read from the host's group now."""
        group = self.host.param_groups[self.index]
        return float(group["lr"]), base_rate(group) * self.shared_mult, float(group.get("weight_decay", 0.0))

    @torch.no_grad()
    def step(self) -> None:
        """The shared parts' step (gradients set by the split), folded into every expert; where the layer's rule
        keeps the tails out of U (`keeps_tails_out`), they are projected out against the updated C."""
        lr_t, lr_s, wd = self.rates()
        self.optimizer.param_groups[0]["lr"] = lr_s
        self.optimizer.step()
        plain, plain_steps = [], []  # the shared parts updated below, all in two calls
        for layer in self.layers:
            views, commit = layer.block.views("data", layer.projs)
            reproject = layer.rule.keeps_tails_out
            for p, w in views.items():
                if wd and lr_t != lr_s:  # W_i decayed at the tails' rate; C decays at the shared part's
                    core.add_to_experts(w, layer.contribution(p), alpha=(lr_t - lr_s) * wd)
                core.fold_shared(w, layer.delta[p].detach(), layer.basis[p], layer.form)
                if reproject:  # the tails re-projected against the updated C
                    layer.shared[p].mul_(1.0 - lr_s * wd).add_(layer.delta[p].detach())
                    core.project_tails(w, layer.contribution(p), layer.basis[p], layer.basis_f.get(p))
            commit()
            if not reproject:
                plain += [layer.shared[p] for p in layer.projs]
                plain_steps += [layer.delta[p].detach() for p in layer.projs]
        if plain:
            if wd:
                torch._foreach_mul_(plain, 1.0 - lr_s * wd)
            torch._foreach_add_(plain, plain_steps)
        torch._foreach_zero_([d.detach() for d in self.parameters()])
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def to(self, device: torch.device) -> None:
        """Move the moments beside their (already moved) deltas."""
        fused = any(g.get("fused") or g.get("capturable") for g in self.optimizer.param_groups)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                # the per-tensor AdamW keeps its step count on the CPU, the fused one beside the parameters
                if torch.is_tensor(value) and (key != "step" or fused):
                    state[key] = value.to(device)


def _like(host: torch.optim.Optimizer, index: int, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer of the host's class and its experts' group's settings over `params`, without weight decay."""
    accepted = inspect.signature(type(host)).parameters  # defaults may hold more (AdamW's decoupled flag)
    # the experts' group's settings over the defaults: optimizers built from group dicts (torchtitan's)
    # keep their betas and eps in the groups, the constructor's defaults being torch's
    settings = {**host.defaults, **host.param_groups[index]}
    settings = {k: v for k, v in settings.items() if k in accepted and k != "params"}
    if _fused_fits(settings, accepted, params):
        # the deltas are a few dozen small tensors: one fused kernel steps them all (lab model: 0.1
        # instead of 0.7 ms a step); its rounding differs from the per-tensor loop's by about an ulp
        settings = {**settings, "fused": True, "foreach": None}
    return type(host)(params, **{**settings, "weight_decay": 0.0})


def _fused_fits(settings: dict, accepted: Mapping, params: list[torch.Tensor]) -> bool:
    """Whether the shared optimizer may use its class's fused kernel: the class has one, the host chose no
    implementation (fused, foreach or differentiable), and the deltas are float tensors on the CPU or CUDA."""
    if "fused" not in accepted or settings.get("fused") is not None or settings.get("foreach") is not None:
        return False
    if settings.get("differentiable") or settings.get("capturable"):
        return False
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16,
                                                                 torch.float64) for p in params)
