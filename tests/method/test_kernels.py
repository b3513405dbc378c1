"""The gradient split's kernels on planted data: tracking, projection on strided views, the mechanism."""

from __future__ import annotations

import torch

from sdmoe.method import kernels
from sdmoe.spectral import (
    exact_top,
    expert_subspaces,
    mean_off_diagonal,
    overlap_matrix,
)


def _planted(e=8, f=24, d=48, k=6, seed=0, noise=0.3):
    """Expert gradients sharing a common k-dim row space (G_i = A_i P^T + noise)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.linalg.qr(torch.randn(d, k, generator=g)).Q
    a = torch.randn(e, f, k, generator=g) * 3.0
    return a @ p.T + noise * torch.randn(e, f, d, generator=g), p


def _overlap(x_EFD, k):
    return mean_off_diagonal(overlap_matrix(expert_subspaces(x_EFD, k)))


def test_tracker_converges_to_the_exact_subspace():
    g, _ = _planted()
    q = torch.linalg.qr(torch.randn(48, 6, generator=torch.Generator().manual_seed(1))).Q.contiguous()
    first = float(kernels.drift(q, exact_top(g, 6)))
    for _ in range(10):
        kernels.track(g, q, iters=1, r=6, rayleigh_ritz=False)
    last = float(kernels.drift(q, exact_top(g, 6)))
    assert first > 0.5 and last < 1e-3


def test_oversampled_tracker_returns_the_best_r():
    g, _ = _planted(k=4)
    q = torch.linalg.qr(torch.randn(48, 8, generator=torch.Generator().manual_seed(1))).Q.contiguous()
    for _ in range(10):
        top = kernels.track(g, q, iters=1, r=4, rayleigh_ritz=True)
    assert float(kernels.drift(top, exact_top(g, 4))) < 1e-3


def test_project_out_on_strided_views():
    g, _ = _planted()
    q = exact_top(g, 6)
    fused = torch.cat([g, g], dim=1).clone()  # E x 2F x D, like gate_up_proj
    down = g.transpose(1, 2).contiguous()  # E x D x F storage; its canonical view is transposed
    views = [fused[:, :24], down.transpose(1, 2)]
    for v in views:
        kernels.project_out(v, q)
        assert float((v @ q).norm()) < 1e-5 * float(v.norm())
        assert torch.allclose(v, g - g @ q @ q.T, atol=1e-5)
    assert torch.equal(fused[:, 24:], g)  # the other half is untouched


def test_normalized_projection_keeps_each_norm():
    g, _ = _planted()
    x = g.clone()
    kernels.project_out(x, exact_top(g, 6), normalize=True)
    assert torch.allclose(x.norm(dim=(1, 2)), g.norm(dim=(1, 2)), rtol=1e-5)


def test_per_step_split_decorrelates_the_tails():
    """The mechanism: with a planted common subspace, tails' gradient overlap falls below the plain one."""
    g, _ = _planted(noise=0.3)
    plain = _overlap(g, 6)
    q = torch.linalg.qr(torch.randn(48, 6, generator=torch.Generator().manual_seed(2))).Q.contiguous()
    for step in range(3):  # a few steps of the same gradient statistics warm the tracker
        gs, _ = _planted(noise=0.3, seed=0)
        top = kernels.track(gs, q, iters=1, r=6, rayleigh_ritz=False)
    tails = g.clone()
    kernels.project_out(tails, top)
    split = _overlap(tails, 6)
    baseline = 6 / 48
    assert plain > 0.8
    assert split < 0.5 * plain and split < 3 * baseline
