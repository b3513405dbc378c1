"""Residual-router option: route on x with its top-R data directions removed.

    router(x) = W_r (x - Q_d Q_d^T x)      Q_d: top-R eigenvectors of E[x x^T] of the layer input

A forward pre-hook on the router module does the projection (the experts
still see the full x). The projection is computed in float32 and handed back
in the input's dtype, so routers that upcast to float32 themselves (DeepSeek)
and routers that do not (Qwen, OLMoE, Mixtral) both keep their own dtype
handling. `fold` writes the same map into the router weight,
W_r <- W_r (I - Q_d Q_d^T), which is how `export` removes the hook.
"""

from __future__ import annotations

import torch

from .hooks import SDMoEHook


class ResidualRouterInput(SDMoEHook):
    """x -> x - (x Q) Q^T on the router's input; Q (D x R, float32) is the layer's `router_basis`,
    a tensor the controller updates in place (a resume loads into it)."""

    def __init__(self, basis_DR: torch.Tensor):
        self.basis = basis_DR

    def __call__(self, module, args):
        q = self.basis
        x = args[0]
        xf = x.float()
        res = xf - (xf @ q) @ q.T
        return (res.to(x.dtype), *args[1:])


@torch.no_grad()
def fold(router: torch.nn.Module, q_DR: torch.Tensor) -> None:
    """W_r <- W_r (I - Q Q^T), computed in float32, stored in the router weight's dtype.

    The weight is E x D, or flat E*D (OLMo-core's router): a (-1, D) view covers both."""
    w = router.weight.view(-1, q_DR.shape[0])
    wf = w.float()
    q = q_DR.float().to(w.device)
    w.copy_((wf - (wf @ q) @ q.T).to(w.dtype))
