"""Guo et al.'s orthogonality and variance losses against a literal re-implementation of the authors' code."""

from __future__ import annotations

import pytest
import torch

from sdmoe.remedies.specialisation import calibrated_weight, orthogonality_loss, variance_loss


def authors_ortho_loss(expert_outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """`MoEGate.compute_ortho_loss` of HongcanGuo/Auxloss-For-Advancing-Expert-Specialization (Model/ds/
    modeling_deepseek.py), its loops as written there, re-typed as the reference."""
    total_loss = 0.0
    for i in range(top_k):
        other_experts = torch.cat([expert_outputs[:, :i], expert_outputs[:, i + 1:]], dim=1)
        u = []
        for j in range(other_experts.size(1)):
            v = other_experts[:, j]
            for u_vec in u:
                proj = (u_vec * v).sum(dim=-1, keepdim=True) * u_vec
                v = v - proj
            v_norm = torch.norm(v, dim=-1, keepdim=True)
            v = v / (v_norm + 1e-6)
            u.append(v)
        current_expert = expert_outputs[:, i]
        proj_loss = 0.0
        for u_vec in u:
            proj = (u_vec * current_expert).sum(dim=-1, keepdim=True) * u_vec
            proj_loss = proj_loss + torch.sum(proj**2)
        total_loss = total_loss + proj_loss
    return total_loss / (top_k * expert_outputs.size(0))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_orthogonality_loss_equals_the_authors_code(k):
    y = torch.randn(37, k, 24, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    assert orthogonality_loss(y).item() == pytest.approx(authors_ortho_loss(y, k).item(), rel=1e-12)


def test_the_orthogonality_loss_measures_overlap():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 16, generator=g, dtype=torch.float64)
    same = torch.stack([a, 3 * a], dim=1)  # two experts that say the same thing: all of each lies in the other
    assert orthogonality_loss(same).item() == pytest.approx((a.pow(2).sum() * 10 / 2 / 50).item(), rel=1e-5)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    apart = torch.stack([q[:, :1].T.expand(50, 16), q[:, 1:2].T.expand(50, 16)], dim=1)  # orthogonal outputs
    assert orthogonality_loss(apart).item() < 1e-20
    assert orthogonality_loss(a[:, None]).item() == 0  # k = 1: nothing to be orthogonal to


def test_the_orthogonality_loss_has_gradients():
    y = torch.randn(8, 2, 6, requires_grad=True)
    orthogonality_loss(y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_the_variance_loss_is_the_authors_term():
    logits = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    scores = logits.softmax(dim=-1)
    assert variance_loss(scores).item() == pytest.approx(torch.var(scores, dim=-1).mean().item())
    assert variance_loss(torch.full((5, 4), 0.25)).item() == 0  # uniform routing: no variance
    assert variance_loss(torch.eye(4)).item() == pytest.approx(0.25)  # one-hot over 4: var = (1 - 1/4) / 3


def test_the_weight_is_the_power_of_ten_nearest_the_target():
    assert calibrated_weight(0.03, 1e-2) == 1.0  # target / value = 0.33: log10 -0.48 rounds to 0
    assert calibrated_weight(3e-4, 1e-2) == 100.0  # 33: log10 1.52 rounds to 2
    assert calibrated_weight(2.5, 1e-4) == pytest.approx(1e-4)  # 4e-5: log10 -4.4 rounds to -4
    assert calibrated_weight(0.0, 1e-2) == 0.0 and calibrated_weight(0.5, 0.0) == 0.0
