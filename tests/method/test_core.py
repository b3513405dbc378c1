"""The method's concepts (method/core.py) on planted data: tracking, the split, the fold, the mechanism."""

from __future__ import annotations

import torch

from sdmoe.method import core
from sdmoe.spectral import exact_top, mean_expert_overlap


def _planted(e=8, f=24, d=48, k=6, seed=0, noise=0.3):
    """Expert gradients sharing a common k-dim row space (G_i = A_i P^T + noise)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.linalg.qr(torch.randn(d, k, generator=g)).Q
    a = torch.randn(e, f, k, generator=g) * 3.0
    return a @ p.T + noise * torch.randn(e, f, d, generator=g), p


def _overlap(x_EFD, k):
    return mean_expert_overlap(x_EFD, k)


def test_tracker_converges_to_the_exact_subspace():
    g, _ = _planted()
    q = torch.linalg.qr(torch.randn(48, 6, generator=torch.Generator().manual_seed(1))).Q.contiguous()
    first = float(core.drift(q, exact_top(g, 6)))
    for _ in range(10):
        core.track_basis(g, q, iters=1, r=6, rayleigh_ritz=False)
    last = float(core.drift(q, exact_top(g, 6)))
    assert first > 0.5 and last < 1e-3


def test_oversampled_tracker_returns_the_best_r():
    g, _ = _planted(k=4)
    q = torch.linalg.qr(torch.randn(48, 8, generator=torch.Generator().manual_seed(1))).Q.contiguous()
    for _ in range(10):
        top = core.track_basis(g, q, iters=1, r=4, rayleigh_ritz=True)
    assert float(core.drift(top, exact_top(g, 4))) < 1e-3


def test_project_out_on_strided_views():
    g, _ = _planted()
    q = exact_top(g, 6)
    fused = torch.cat([g, g], dim=1).clone()  # E x 2F x D, like gate_up_proj
    down = g.transpose(1, 2).contiguous()  # E x D x F storage; its canonical view is transposed
    views = [fused[:, :24], down.transpose(1, 2)]
    for v in views:
        core.project_out(v, q)
        assert float((v @ q).norm()) < 1e-5 * float(v.norm())
        assert torch.allclose(v, g - g @ q @ q.T, atol=1e-5)
    assert torch.equal(fused[:, 24:], g)  # the other half is untouched


def test_per_step_split_decorrelates_the_tails():
    """The mechanism: with a planted common subspace, tails' gradient overlap falls below the plain one."""
    g, _ = _planted(noise=0.3)
    plain = _overlap(g, 6)
    q = torch.linalg.qr(torch.randn(48, 6, generator=torch.Generator().manual_seed(2))).Q.contiguous()
    for step in range(3):  # a few steps of the same gradient statistics warm the tracker
        gs, _ = _planted(noise=0.3, seed=0)
        top = core.track_basis(gs, q, iters=1, r=6, rayleigh_ritz=False)
    tails = g.clone()
    core.project_out(tails, top)
    split = _overlap(tails, 6)
    baseline = 6 / 48
    assert plain > 0.8
    assert split < 0.5 * plain and split < 3 * baseline


def test_the_two_parts_sum_to_the_gradient_and_tails_are_orthogonal():
    g, _ = _planted()
    q = exact_top(g, 6)
    g_EPFD = g.clone().unsqueeze(1)
    shared = core.shared_gradient(g_EPFD, "full", q.unsqueeze(0))
    core.split_tails(g_EPFD, q.unsqueeze(0))
    assert torch.allclose(g_EPFD.sum(0) + shared, g.sum(0).unsqueeze(0), atol=1e-4)
    assert float((g_EPFD @ q).norm()) < 1e-5 * float(g_EPFD.norm())
    assert float((shared - shared @ q @ q.T).norm()) < 1e-5 * float(shared.norm())
    # the control: the plain sum, tails untouched
    assert torch.equal(core.shared_gradient(g.unsqueeze(1), "full", None), g.sum(0).unsqueeze(0))


def test_fold_and_project_tails():
    g, _ = _planted()
    u = exact_top(g, 6)
    w = g.clone()
    for form, shared in (("full", torch.randn(24, 48)), ("lowrank", torch.randn(24, 6)), ("per_expert", torch.randn(8, 24, 6))):
        w = g.clone()
        core.fold_shared(w, shared, u, form)
        c = shared if form == "full" else shared @ u.T
        assert torch.allclose(w, g + c, atol=1e-5)
    c = core.shared_at_split(g, u, "lowrank") @ u.T
    w = g.clone()
    core.project_tails(w, c, u)
    tails = w - c
    assert float((tails @ u).norm()) < 1e-5 * float(tails.norm())
    assert torch.allclose(w @ (torch.eye(48) - u @ u.T), g @ (torch.eye(48) - u @ u.T), atol=1e-5)  # outside U: kept
    a = core.shared_at_split(g, u, "per_expert")  # exact: W_i = A_i U^T + T_i with T_i U = 0 changes nothing
    w = g.clone()
    core.project_tails(w, a @ u.T, u)
    assert torch.allclose(w, g, atol=1e-5)


def _host_like(g):
    """The views the training step passes: the gate and up halves of a fused (E, 2F, D) tensor and the
    transposed view of an (E, D, F) down tensor, all holding g."""
    fused = torch.cat([g, g], dim=1).clone()
    down = g.transpose(1, 2).contiguous()
    return [fused[:, : g.shape[1]], fused[:, g.shape[1]:], down.transpose(1, 2)]


def test_one_pass_split_matches_the_two_functions_on_strided_views():
    """split_gradient = shared_gradient + split_tails for every form, on the host's own views."""
    g, _ = _planted()
    q_PDR = torch.stack([exact_top(g, 6), exact_top(g + 0.1, 6), exact_top(g.flip(0), 6)])
    for form in ("full", "lowrank", "per_expert"):
        want = _host_like(g)
        shared_want = core.shared_gradient(want, form, q_PDR)
        core.split_tails(want, q_PDR)
        got = _host_like(g)
        shared_got = core.split_gradient(got, q_PDR, form)
        assert shared_got.shape == shared_want.shape
        assert torch.allclose(shared_got, shared_want, atol=1e-4, rtol=1e-5), form
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5)


def test_adding_to_experts_in_either_orientation():
    g, _ = _planted()
    c = torch.randn(24, 48)
    for view in _host_like(g):
        core.add_to_experts(view, c, alpha=0.5)
        assert torch.allclose(view, g + 0.5 * c, atol=1e-6)
