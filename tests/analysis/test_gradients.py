"""Finding 2: gradient overlap and low-rankness, data spectrum, on constructed tensors and a live model."""

import math

import pytest
import torch

from sdmoe.analysis.capture import capture
from sdmoe.analysis.gradients import data_spectrum, gradient_findings, gradient_overlap
from sdmoe.moe import find_moe_blocks


def test_identical_gradients_overlap_one_and_idle_experts_left_out():
    g = torch.randn(1, 8, 32).repeat(4, 1, 1)
    g[3] = 0  # an expert no token reached
    rec = gradient_overlap(g, k=2, r=2)
    assert rec.active_experts == [0, 1, 2]
    assert rec.mean_overlap == pytest.approx(1.0, abs=1e-4)
    assert rec.overlap[3] == [0.0] * 4 and rec.grad_norms[3] == 0
    assert rec.lowrank_share[3] == 0


def test_rank_one_gradient_is_low_rank():
    a, b = torch.randn(5, 16, 1), torch.randn(5, 1, 40)
    rec = gradient_overlap(a @ b, k=2, r=1)
    assert min(rec.lowrank_share) > 0.999 and rec.lowrank_baseline == 1 / 16


def test_data_spectrum_isotropic_vs_low_rank():
    g = torch.Generator().manual_seed(0)
    iso = data_spectrum(torch.eye(32, dtype=torch.float64), k=4)
    assert iso.topk_share == pytest.approx(4 / 32) and iso.effective_rank == pytest.approx(32)
    x = torch.randn(500, 3, generator=g) @ torch.randn(3, 32, generator=g)
    low = data_spectrum(x.T.double() @ x.double() / 500, k=4)
    assert low.topk_share > 0.999 and low.effective_rank < 3.01
    assert low.eigvals == sorted(low.eigvals, reverse=True)


def test_live_model(make_model, batches):
    model = make_model()
    before = [p.requires_grad for p in model.parameters()]
    grads, data = gradient_findings(model, batches, k=4)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # mode restored
    assert [(r.layer, r.projection) for r in grads] == [(l, p) for l in (0, 1) for p in ("gate", "up", "down")]
    for r in grads:
        assert len(r.active_experts) >= 2 and not math.isnan(r.mean_overlap)
        assert 0 <= r.mean_overlap <= 1
    assert [x.n_tokens for x in data] == [2 * 4 * 24] * 2


def test_canonical_grads_match_autograd(make_model, batches):
    """The gate slice of the fused gradient is the gradient of the gate weights."""
    model = make_model()
    block = find_moe_blocks(model)[0]
    assert block.canonical("grad") == {}  # no backward yet: no gradient to read
    loss = model(input_ids=batches[0]).logits.pow(2).mean()
    loss.backward()
    g = block.canonical("grad", local_shards=False)
    f = block.expert_ffn
    assert torch.equal(g["gate"], block.experts.gate_up_proj.grad[:, :f])
    assert torch.equal(g["down"], block.experts.down_proj.grad.transpose(1, 2))
    w = block.canonical("data")
    assert set(w) == {"gate", "up", "down"} and torch.equal(w["up"], block.experts.gate_up_proj[:, f:])


def test_capture_records_routing_and_domains(make_model, batches):
    model = make_model()
    doms = [torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 0, 0])]
    caps = capture(model, batches, doms, with_grads=False, sample_tokens=50)
    cap = caps[0]
    assert cap.indices_TK().shape == (2 * 4 * 24, 2)
    assert cap.domains_T().tolist()[:24] == [0] * 24 and cap.domains_T().tolist()[24:48] == [1] * 24
    assert cap.sample_TD().shape == (50, 32) and cap.grads is None
