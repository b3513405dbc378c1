"""Guo et al., "Advancing Expert Specialization for Better MoE" (arXiv 2505.22323, NeurIPS 2025): two loss terms
added to the training loss, beside the usual balance loss.

    L = L_lm + L_balance + w_o * orthogonality_loss(y_TKD) - w_v * variance_loss(p_TE)

- `orthogonality_loss`: each token's routed experts should produce outputs that do not overlap. For token t with
  top-k outputs y_t1..y_tk, each y_ti is projected onto the span of the other k - 1 (an orthonormal basis of them
  by Gram-Schmidt, in top-k order) and the projection's squared norm is summed; the mean over tokens and k.
- `variance_loss`: the variance of each token's routing probabilities over the experts (torch.var's unbiased
  estimate), mean over tokens; subtracted, so routing grows more decisive.
- The weights: the authors' code picks each term's weight once, at the first step, as the power of ten that brings
  the term near a target (`calibrated_weight`; targets 1e-4 for the orthogonality term, 1e-2 for the variance
  term, their defaults). A fixed weight may be given instead.

Checked against the authors' code (HongcanGuo/Auxloss-For-Advancing-Expert-Specialization, Model/ds/
modeling_deepseek.py, `MoEGate.compute_ortho_loss` and the variance term of `MoEGate.forward`): the same values for
the same [T, k, D] outputs and [T, E] probabilities (tests/remedies/test_specialisation.py re-implements their loop
literally as the reference). Two differences, deliberate: their `DeepseekMoE.forward` reshapes the concatenated
outputs, which are ordered by expert, as if they were ordered by token (so its pairs are not a token's own experts;
here they are), and calibrates the orthogonality weight on the router's weight rows instead of expert outputs
(here: on the first step's outputs).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6  # the authors' normaliser: v / (|v| + eps)
ORTHOGONALITY_TARGET = 1e-4
VARIANCE_TARGET = 1e-2


def orthogonality_loss(y_TKD: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean over tokens and k of the squared projection of each routed expert's output onto the span of the
    token's other routed experts' outputs (Gram-Schmidt basis, in top-k order). 0 for k = 1."""
    t, k, _ = y_TKD.shape
    if k < 2:
        return y_TKD.new_zeros(())
    total = y_TKD.new_zeros(())
    for i in range(k):
        others_TJD = torch.cat([y_TKD[:, :i], y_TKD[:, i + 1:]], dim=1)
        basis: list[torch.Tensor] = []  # orthonormal (to eps) basis of the others, [T, D] each
        for j in range(k - 1):
            v_TD = others_TJD[:, j]
            for u_TD in basis:
                v_TD = v_TD - (u_TD * v_TD).sum(-1, keepdim=True) * u_TD
            basis.append(v_TD / (v_TD.norm(dim=-1, keepdim=True) + eps))
        x_TD = y_TKD[:, i]
        for u_TD in basis:  # |(u . x) u|^2, summed over the basis and the tokens
            total = total + (((u_TD * x_TD).sum(-1, keepdim=True) * u_TD) ** 2).sum()
    return total / (k * t)


def variance_loss(p_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the (unbiased) variance of the token's routing probabilities over the experts."""
    return torch.var(p_TE, dim=-1).mean()


def calibrated_weight(value: float, target: float) -> float:
    """The power of ten that brings a loss term of `value` nearest to `target` (the authors' first-step rule);
    0 when the target or the value is 0."""
    if target == 0 or value == 0 or not math.isfinite(value):
        return 0.0
    return 10.0 ** round(math.log10(target / value))
