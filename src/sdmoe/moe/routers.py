"""The router of an MoE block: the module whose weight is E x D, its input the layer's input.

Most routers are that module (transformers' TopKRouter `gate` / `router`, Mixtral's Linear `gate`,
torchtitan's `router.gate`, OLMo-core's router with a flat E*D weight). Where the weight sits inside the
module that decides (`adapters.NESTED_ROUTERS`: HunYuan's `gate.wg`, JetMoE's and DBRX's `router.layer`,
Longcat's `router.classifier`, AFMoE's `router.gate`), or where the deciding module returns something
other than transformers 5's `(logits, scores, indices)` (Llama 4's `(scores, logits)`, JetMoE's sorted
dispatch), the block's router is a `RouterAdapter`: the weight, pre-hooks on the module that owns it,
and forward hooks that see `(logits, scores, indices)`.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import NESTED_ROUTERS, ROUTER_PATHS, _module_at


def _canonical_routing(out, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router's output as transformers 5's (logits, scores, indices): a tuple already in that form is
    returned as it is; else the logits are its last float tensor with one column per expert (Llama 4's
    `(scores, logits)`, JetMoE's `(..., logits)`, DBRX's bare logits), and the top-k of the logits are the
    experts chosen (scores: their logits)."""
    if isinstance(out, tuple) and len(out) >= 3 and isinstance(out[2], torch.Tensor) and not out[2].is_floating_point():
        return out
    parts = out if isinstance(out, tuple) else (out,)
    logits = [t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2
              and t.shape[-1] == num_experts][-1].reshape(-1, num_experts)
    scores, indices = logits.topk(top_k, dim=-1)
    return logits, scores, indices


class RouterAdapter:
    """A router whose weight lives in a submodule of the module that routes, or whose output is not
    `(logits, scores, indices)`: `weight` is the E x D weight; pre-hooks go on the module that owns it
    (its input is the layer's input, and `export` folds into its weight); forward hooks go on the routing
    module and see its output as `(logits, scores, indices)`. Forward hooks here only read: what they
    return is dropped. Other attributes (`e_score_correction_bias`) are the routing module's."""

    def __init__(self, weight_module: nn.Module, routing_module: nn.Module, num_experts: int, top_k: int):
        self.weight_module, self.routing_module = weight_module, routing_module
        self.num_experts, self.top_k = num_experts, top_k

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_module.weight

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.weight_module.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook, **kwargs):
        def canonical(*args):  # (module, args[, kwargs], output)
            hook(*args[:-1], _canonical_routing(args[-1], self.num_experts, self.top_k))

        return self.routing_module.register_forward_hook(canonical, **kwargs)

    def __getattr__(self, name: str):
        if name in ("weight_module", "routing_module", "num_experts", "top_k"):  # before __init__ (copy, pickle)
            raise AttributeError(name)
        return getattr(self.routing_module, name)


def router_of(block: nn.Module, num_experts: int, hidden: int, paths: tuple[str, ...] = ROUTER_PATHS
              ) -> nn.Module | RouterAdapter | None:
    """The router at one of `paths` (the layout's: `ExpertLayout.router_paths`) whose weight is E x D (or
    OLMo-core's flat E*D); a `RouterAdapter` where the weight is nested (`NESTED_ROUTERS`) or the router is a
    Linear with a forward of its own (Llama 4's returns `(scores, logits)`); None where there is none."""
    def fits(module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, torch.Tensor) and tuple(w.shape) in ((num_experts, hidden), (num_experts * hidden,))

    top_k = next((k for m in (block, getattr(block, "gate", None), getattr(block, "router", None))
                  if isinstance(k := getattr(m, "top_k", None), int) and k > 0), None)
    for path in paths:
        r = _module_at(block, path)
        if fits(r):
            own_forward = isinstance(r, nn.Linear) and type(r).forward is not nn.Linear.forward
            if own_forward and top_k is not None:
                return RouterAdapter(r, r, num_experts, top_k)
            return None if own_forward else r
    for path in NESTED_ROUTERS:
        r = _module_at(block, path)
        if fits(r) and top_k is not None:
            return RouterAdapter(r, _module_at(block, path.split(".")[0]), num_experts, top_k)
    return None
