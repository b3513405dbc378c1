"""A cheap training-time view of findings 1 and 2, for the trainer's log.

`spectral_snapshot(model, k)` -> flat dict of floats:

    "param_overlap/L{layer}/{proj}"  mean off-diagonal overlap of the experts' top-k subspaces
    "grad_overlap/L{layer}/{proj}"   the same on the experts' current .grad (only when present)
    "param_overlap/mean", "grad_overlap/mean", "overlap_baseline" (k/D)

Works on a plain model and on one whose experts are parametrized (SD-MoE):
reading the expert weights through `sdmoe.moe` returns the materialised W_i.
Gradients are read only from plain expert parameters (a parametrized weight
is not a leaf and has no `.grad`). Runs under no_grad; touches nothing.
Under FSDP2 it is collective (every rank calls it) and sees every expert.
Cost per layer and projection: E Gram products and eigendecompositions of
D x D (randomized subspace iteration above D = 1024).
"""

from __future__ import annotations

import torch
from torch import nn

from sdmoe.analysis.parameters import choose_method
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.sharding import unsharded, whole
from sdmoe.spectral import mean_expert_overlap


def _mean_overlap(w_EFD: torch.Tensor, k: int) -> float | None:
    w = w_EFD.detach().float()
    w = w[w.flatten(1).abs().amax(1) > 0]  # experts with no weight/gradient have no subspace
    if w.shape[0] < 2:
        return None
    d = w.shape[-1]
    k = max(1, min(k, d - 1))
    return mean_expert_overlap(w, k, choose_method(d))


@torch.no_grad()
def spectral_snapshot(model: nn.Module, k: int = 8, layers: list[int] | None = None, grads: bool = True) -> dict[str, float]:
    """Mean off-diagonal parameter (and gradient) overlap per layer and projection."""
    out: dict[str, float] = {}
    params, grad_vals = [], []
    d = None
    for block in find_moe_blocks(model, layers):
        d = block.hidden_size
        # FSDP2: gradients gathered whole, weights read inside an unshard of their layer
        g = block.canonical("grad", local_shards=False) if grads else {}
        for p, w in g.items():
            v = _mean_overlap(whole(w), k)
            if v is None:
                continue
            out[f"grad_overlap/L{block.layer}/{p}"] = v
            grad_vals.append(v)
        with unsharded(model, block.name):
            for p, w in block.projections().items():
                v = _mean_overlap(w, k)
                if v is not None:
                    out[f"param_overlap/L{block.layer}/{p}"] = v
                    params.append(v)
    if params:
        out["param_overlap/mean"] = sum(params) / len(params)
    if grad_vals:
        out["grad_overlap/mean"] = sum(grad_vals) / len(grad_vals)
    if d:
        out["overlap_baseline"] = max(1, min(k, d - 1)) / d
    return out
