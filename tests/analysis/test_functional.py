"""Functional signs on hand-constructed routing."""

import math

import pytest
import torch

from sdmoe.analysis.functional import functional_findings, output_cosine
from sdmoe.errors import UserError
from sdmoe.moe.checkpoint import LayerWeights


def test_everything_to_expert_zero():
    rec = functional_findings(torch.zeros(100, 1, dtype=torch.long), num_experts=4)
    assert rec.load == [1.0, 0.0, 0.0, 0.0]
    assert rec.load_entropy == 0.0 and rec.shared_experts == [0]
    assert rec.coactivation[0][0] == 1.0 and rec.coactivation[1][1] == 0.0


def test_balanced_top2_and_coactivation():
    idx = torch.tensor([[0, 1], [2, 3]] * 50)
    rec = functional_findings(idx, num_experts=4)
    assert rec.load == [0.25] * 4 and rec.load_entropy == pytest.approx(1.0)
    assert rec.shared_experts == []
    assert rec.coactivation[0][1] == 0.5 and rec.coactivation[0][2] == 0.0


def test_domain_mutual_information():
    idx = torch.tensor([[0], [1]] * 50)
    dom = torch.tensor([0, 1] * 50)
    rec = functional_findings(idx, 2, token_domains=dom, domain_names=["a", "b"])
    assert rec.domain_mi_nats == pytest.approx(math.log(2)) and rec.domain_mi_normalized == pytest.approx(1.0)
    assert rec.domain_load == [[1.0, 0.0], [0.0, 1.0]]
    mixed = functional_findings(idx, 2, token_domains=torch.tensor([0, 0, 1, 1] * 25))
    assert mixed.domain_mi_nats == pytest.approx(0.0, abs=1e-9)


def test_output_cosine_identical_and_opposite_experts():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g), torch.randn(1, 16, 8, generator=g)
    w = LayerWeights(0, "x", torch.cat([gate, gate, gate]), torch.cat([up, up, up]), torch.cat([down, down, -down]), None)
    x = torch.randn(20, 16, generator=g)
    c = output_cosine(x, w.gate_EFD, w.up_EFD, w.down_EDF)
    assert c[0, 1] == pytest.approx(1.0, abs=1e-5) and c[0, 2] == pytest.approx(-1.0, abs=1e-5)
    rec = functional_findings(torch.zeros(5, 1, dtype=torch.long), 3, weights=w, sample_TD=x)
    assert rec.output_cosine_mean == pytest.approx((1 - 1 - 1) * 2 / 6, abs=1e-5)


def test_bad_routing():
    with pytest.raises(UserError, match="no routing"):
        functional_findings(torch.zeros(0, 2, dtype=torch.long), 4)
    with pytest.raises(UserError, match="outside"):
        functional_findings(torch.tensor([[5]]), 4)
