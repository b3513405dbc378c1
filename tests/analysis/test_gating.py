"""Finding 3: router rows against the data subspace, routing agreement."""

import pytest
import torch

from sdmoe.analysis.gating import gating_findings, routing_agreement
from sdmoe.analysis.gradients import data_spectrum
from sdmoe.errors import UserError
from sdmoe.spectral import second_moment


def _planted(d=64, k=4, t=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, k, generator=g)).Q
    x = 5 * torch.randn(t, k, generator=g) @ u.T + 0.05 * torch.randn(t, d, generator=g)
    return u, x, g


def test_router_in_data_subspace_is_aligned_and_agrees():
    u, x, g = _planted()
    spec = data_spectrum(second_moment(x), k=4)
    assert spec.topk_share > 0.99 and spec.baseline == 4 / 64
    router = torch.randn(8, 4, generator=g) @ u.T  # rows inside the data subspace
    rec = gating_findings(router, spec.basis_DK, {"gate": u}, x, top_k=2)
    assert min(rec.data_alignment) > 0.99
    assert rec.common_alignment_mean["gate"] > 0.99
    assert rec.agreement_exact > 0.95 and rec.agreement_jaccard > 0.97
    assert rec.random_agreement_exact < rec.agreement_exact


def test_random_router_near_baseline():
    u, x, g = _planted(d=128, k=4)
    spec = data_spectrum(second_moment(x), k=4)
    router = torch.randn(64, 128, generator=g)
    rec = gating_findings(router, spec.basis_DK, None, x, top_k=2)
    assert 0.3 * rec.data_baseline < rec.data_alignment_mean < 2.5 * rec.data_baseline


def test_agreement_on_full_basis_is_one():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(100, 16, generator=g), torch.randn(6, 16, generator=g)
    assert routing_agreement(x, w, torch.eye(16), 2) == (1.0, 1.0)


def test_bad_inputs():
    with pytest.raises(UserError, match="no router"):
        gating_findings(None, torch.eye(8)[:, :2])
    with pytest.raises(UserError, match="hidden size"):
        gating_findings(torch.randn(4, 8), torch.eye(16)[:, :2])
    with pytest.raises(UserError, match="top_k"):
        gating_findings(torch.randn(4, 8), torch.eye(8)[:, :2], top_k=5)
