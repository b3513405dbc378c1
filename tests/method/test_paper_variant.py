"""The paper's own split: two-sided fixed bases from the shared weight, refreshed on a schedule."""

from __future__ import annotations

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.method import SDMoE, SDMoEConfig, convert
from sdmoe.spectral import common_subspace

from .method_helpers import batch, lm_loss, make_model

KINDS = ("qwen3_moe", "module_list")


def _paper(**kw) -> SDMoEConfig:
    base = dict(form="full", gradient_split="fixed", projection_sides="two", basis_source="shared",
                basis_method="randomized", refresh_every=16, rank=4, split_step=0)
    return SDMoEConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", KINDS)
def test_the_two_parts_sum_to_the_gradient_and_the_unique_one_is_orthogonal_to_both_bases(kind):
    model, ids = make_model(kind), batch()
    ctl = convert(model, _paper())
    lm_loss(model, ids).backward()
    whole = [{p: g.clone() for p, g in b.canonical("grad").items()} for b in ctl.blocks]
    ctl.after_backward(0)
    for layer, g in zip(ctl.layers, whole):
        tails = layer.block.canonical("grad")
        for p in ("gate", "up", "down"):
            u_d, u_f = layer.basis[p], layer.basis_f[p]
            assert u_f.shape == (16, 4) and u_d.shape == (32, 4)
            # unique: (I - P_F) G_i (I - P_D), orthogonal to both bases
            assert float((tails[p] @ u_d).norm()) <= 1e-5 * float(tails[p].norm())
            assert float((u_f.T @ tails[p]).norm()) <= 1e-5 * float(tails[p].norm())
            want = g[p] - u_f @ u_f.T @ g[p] - g[p] @ u_d @ u_d.T + u_f @ u_f.T @ g[p] @ u_d @ u_d.T
            assert torch.allclose(tails[p], want, atol=1e-6, rtol=1e-4)
            # common: P_F G + (I - P_F) G P_D of the sum; the two parts add up to the whole gradient
            assert torch.allclose(tails[p].sum(0) + layer.delta[p].grad, g[p].sum(0), atol=1e-5, rtol=1e-4)


def test_bases_are_the_shared_weights_own_singular_vectors():
    model = make_model("qwen3_moe")
    ctl = convert(model, _paper(basis_method="exact"))
    for layer in ctl.layers:
        for p in layer.projs:
            s = layer.shared[p].float()
            u, _, vh = torch.linalg.svd(s)
            # the same subspaces as the exact SVD's top-4 (overlap 1)
            assert float((layer.basis[p].T @ vh[:4].T).square().sum()) == pytest.approx(4, abs=1e-4)
            assert float((layer.basis_f[p].T @ u[:, :4]).square().sum()) == pytest.approx(4, abs=1e-4)


def test_the_randomized_range_finder_matches_the_exact_basis_on_a_planted_spectrum():
    g = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(48, 6, generator=g)).Q
    right = torch.linalg.qr(torch.randn(64, 6, generator=g)).Q
    s = left @ torch.diag(torch.tensor([50.0, 40, 30, 20, 15, 10])) @ right.T + 0.01 * torch.randn(48, 64, generator=g)
    exact = common_subspace(s.unsqueeze(0), 6)[0]
    fast = common_subspace(s.unsqueeze(0), 6, "randomized", oversample=8, iters=1)[0]
    assert float((exact.T @ fast).square().sum()) / 6 > 1 - 1e-4


def test_refresh_happens_exactly_on_schedule_and_follows_the_shared_weight():
    model = make_model("qwen3_moe")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ctl = SDMoE(model, _paper(refresh_every=3, split_step=2, basis_method="exact"))
    before = None
    for step in range(11):  # ends right after the refresh at step 10: the bases are S's of that moment
        ctl.before_forward(step, opt)
        if step == 2:
            before = ctl.layers[0].basis["gate"].clone()
        lm_loss(model, batch(step)).backward()
        ctl.after_backward(step)
        opt.step()
        ctl.after_optimizer_step(step)
        opt.zero_grad()
    # split at 2; refreshed after steps 4, 7, 10 (every 3 optimizer steps after the split)
    assert ctl.refreshed_at == [4, 7, 10]
    layer = ctl.layers[0]
    vh = torch.linalg.svd(layer.shared["gate"].float()).Vh
    assert float((layer.basis["gate"].T @ vh[:4].T).square().sum()) == pytest.approx(4, abs=1e-3)
    assert not torch.allclose(layer.basis["gate"], before)  # it moved with S


def test_rank_fraction_sets_k_from_d():
    ctl = SDMoE(make_model("qwen3_moe"), SDMoEConfig(rank_fraction=0.25, split_step=0))
    assert ctl.ranks == [8, 8]


@pytest.mark.parametrize("cfg, fragment", [
    (dict(projection_sides="two"), "projection_sides='two' splits in fixed bases"),
    (dict(projection_sides="two", gradient_split="fixed", basis_source="gradients"), "lacks; use basis_source"),
    (dict(basis_source="shared", form="lowrank", gradient_split="fixed"), "basis_source='shared' takes U"),
    (dict(refresh_every=4, basis_source="activations"), "use reestimate_every"),
    (dict(rank=4, rank_fraction=0.5), "both set the rank"),
    (dict(rank_fraction=1.5), "rank_fraction=1.5 is out of range"),
    (dict(basis_method="quantum"), "unknown basis_method 'quantum'"),
    (dict(range_power_iters=0), "range_power_iters=0 is out of range"),
])
def test_bad_paper_settings_are_one_line(cfg, fragment):
    with pytest.raises(UserError) as e:
        SDMoEConfig(**cfg).validate()
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_two_sided_rank_must_fit_the_ffn_side():
    with pytest.raises(UserError, match="larger expert ffn width"):
        SDMoE(make_model("qwen3_moe"), _paper(rank=16))
