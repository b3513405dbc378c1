"""Finding 1 on constructed weights, live models and checkpoints."""

import pytest
import torch

from sdmoe.analysis.parameters import (
    layer_findings,
    parameter_findings,
    projection_findings,
)
from sdmoe.errors import UserError
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.checkpoint import ExpertCheckpoint, weights_of_block
from sdmoe.spectral import energy_share, subspace_overlap


def test_identical_experts_overlap_one():
    w = torch.randn(1, 16, 64).repeat(5, 1, 1)
    rec = projection_findings(w, k=4)
    assert rec.mean_overlap == pytest.approx(1.0, abs=1e-4)
    assert rec.ratio == pytest.approx(64 / 4, rel=1e-3)
    assert len(rec.overlap) == 5 and len(rec.singular_values[0]) == 4


def test_random_experts_near_baseline():
    torch.manual_seed(0)
    w = torch.randn(16, 24, 128)
    rec = projection_findings(w, k=4)
    assert rec.baseline == 4 / 128
    assert 0.5 < rec.ratio < 1.6
    # orthogonal row spaces: exactly 0
    q = torch.linalg.qr(torch.randn(128, 128)).Q
    w_orth = torch.stack([torch.randn(8, 8) @ q[:, 8 * i : 8 * i + 8].T for i in range(8)])
    assert projection_findings(w_orth, k=4).mean_overlap < 1e-5


def test_planted_shared_subspace_recovered():
    torch.manual_seed(1)
    d, r = 96, 6
    u = torch.linalg.qr(torch.randn(d, r)).Q
    w = torch.stack([10 * torch.randn(32, r) @ u.T + 0.1 * torch.randn(32, d) for _ in range(8)])
    rec = projection_findings(w, k=r, r=r)
    assert subspace_overlap(rec.basis_DR, u) > 0.99
    assert min(rec.common_energy) > 0.9 and rec.common_baseline == r / d
    assert rec.ratio > 10 and min(rec.topk_energy) > 0.9
    assert "basis_DR" not in rec.to_dict()
    assert torch.allclose(torch.tensor(rec.common_energy), energy_share(w, rec.basis_DR), atol=1e-5)


def test_randomized_path_agrees_with_gram():
    torch.manual_seed(2)
    u = torch.linalg.qr(torch.randn(64, 4)).Q
    w = torch.stack([5 * torch.randn(16, 4) @ u.T + 0.05 * torch.randn(16, 64) for _ in range(4)])
    a = projection_findings(w, k=4, method="gram")
    b = projection_findings(w, k=4, method="randomized")
    assert a.mean_overlap == pytest.approx(b.mean_overlap, abs=1e-3)


def test_bad_rank():
    w = torch.randn(4, 8, 16)
    for k in (0, 16, 40, 2.5):
        with pytest.raises(UserError, match="rank"):
            projection_findings(w, k=k)


def test_checkpoint_and_live_model_give_identical_figures(tmp_path, make_model):
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    live = parameter_findings((weights_of_block(b) for b in find_moe_blocks(model)), k=4)
    disk = parameter_findings(ExpertCheckpoint(tmp_path / "m").iter_layers(), k=4)
    assert [(r.layer, r.projection) for r in live] == [(r.layer, r.projection) for r in disk]
    assert len(live) == 2 * 3
    for a, b in zip(live, disk):
        da, db = a.to_dict(), b.to_dict()
        for key in ("overlap", "singular_values", "common_energy", "mean_overlap"):
            assert torch.allclose(torch.tensor(da[key]), torch.tensor(db[key]), atol=1e-6), key


def test_layer_findings_down_is_hidden_last(make_model):
    model = make_model(hidden_size=32, expert_ffn=8)
    recs = layer_findings(weights_of_block(find_moe_blocks(model)[0]), k=4)
    assert [r.projection for r in recs] == ["gate", "up", "down"]
    assert all(r.d == 32 for r in recs)
