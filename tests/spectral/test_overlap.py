import math

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.spectral import (
    expert_subspaces,
    mean_expert_overlap,
    mean_off_diagonal,
    overlap_matrix,
    random_overlap_baseline,
    subspace_overlap,
)

from .spectral_helpers import make_gen, orthonormal, planted_stack


def test_subspace_overlap_extremes():
    gen = make_gen(0)
    q = orthonormal(32, 8, gen)
    assert subspace_overlap(q, q) == pytest.approx(1.0, abs=1e-6)
    # orthogonal complement -> 0
    full = torch.linalg.qr(torch.cat([q, torch.randn(32, 24, generator=gen)], 1).double()).Q.float()
    assert subspace_overlap(full[:, :8], full[:, 8:16]) == pytest.approx(0.0, abs=1e-6)
    # half the directions shared -> 0.5
    mixed = torch.cat([full[:, :4], full[:, 8:12]], 1)
    assert subspace_overlap(full[:, :8], mixed) == pytest.approx(0.5, abs=1e-6)
    # different ranks: a subspace inside a bigger one -> 1
    assert subspace_overlap(full[:, :3], full[:, :10]) == pytest.approx(1.0, abs=1e-6)
    # invariant to the choice of basis inside the subspace
    rot = torch.linalg.qr(torch.randn(8, 8, generator=gen)).Q
    assert subspace_overlap(q @ rot, q) == pytest.approx(1.0, abs=1e-6)


def test_identical_experts_overlap_one():
    gen = make_gen(1)
    w = torch.randn(1, 16, 40, generator=gen).repeat(6, 1, 1)
    o = overlap_matrix(expert_subspaces(w, 5))
    assert o.shape == (6, 6)
    assert torch.allclose(o, torch.ones(6, 6), atol=1e-5)
    assert mean_off_diagonal(o) == pytest.approx(1.0, abs=1e-5)


def test_independent_random_subspaces_overlap_k_over_d():
    # Gaussian experts have Haar-random right singular subspaces, so every
    # pairwise overlap has mean k/d exactly. For large d the entries of P^T Q are
    # ~N(0, 1/d), so one overlap has sd ~ sqrt(2)/d (chi^2 with k^2 dof, / (k d)),
    # and the mean of the E(E-1)/2 pairs sd ~ sqrt(2)/d/sqrt(pairs) = 0.0020 here
    # (30 seeds measured 0.0018). Tolerance: 5 sd = 0.010, i.e. 16% of k/d.
    e, f, d, k = 16, 64, 64, 4
    gen = make_gen(2)
    w = torch.randn(e, f, d, generator=gen)
    o = overlap_matrix(expert_subspaces(w, k))
    baseline = random_overlap_baseline(k, d)
    assert baseline == k / d
    tol = 5 * math.sqrt(2) / d / math.sqrt(e * (e - 1) / 2)
    assert abs(mean_off_diagonal(o) - baseline) < tol
    # and a planted shared subspace is far above it
    wp, _ = planted_stack(e, f, d, k, 1e-2, gen)
    assert mean_off_diagonal(overlap_matrix(expert_subspaces(wp, k))) > 0.99


def test_mean_expert_overlap_is_the_mean_off_diagonal_of_the_experts_overlaps():
    gen = make_gen(5)
    w = torch.randn(5, 12, 16, generator=gen)
    assert mean_expert_overlap(w, 3) == mean_off_diagonal(overlap_matrix(expert_subspaces(w, 3)))
    # identical experts share their subspace; a planted shared one stays far above k/d
    assert mean_expert_overlap(w[:1].repeat(4, 1, 1), 3) == pytest.approx(1.0, abs=1e-5)
    wp, _ = planted_stack(6, 32, 48, 4, 1e-2, gen)
    assert mean_expert_overlap(wp, 4, "randomized", iters=4) > 0.99 > 4 / 48
    # bf16 storage is computed in float32, like expert_subspaces
    assert mean_expert_overlap(w.to(torch.bfloat16), 3) == mean_off_diagonal(
        overlap_matrix(expert_subspaces(w.to(torch.bfloat16), 3)))
    with pytest.raises(UserError, match="at least 2"):
        mean_expert_overlap(w[:1], 3)


def test_overlap_matrix_matches_pairwise():
    gen = make_gen(3)
    u = expert_subspaces(torch.randn(4, 8, 12, generator=gen), 3)
    o = overlap_matrix(u)
    for a in range(4):
        for b in range(4):
            assert float(o[a, b]) == pytest.approx(subspace_overlap(u[a], u[b]), abs=1e-6)
    assert torch.allclose(o, o.T)


def test_zero_and_half_precision_bases():
    u = expert_subspaces(torch.zeros(3, 4, 8), 2)
    o = overlap_matrix(u)
    assert torch.isfinite(o).all()
    uh = expert_subspaces(torch.randn(3, 4, 8, generator=make_gen(4)), 2).to(torch.bfloat16)
    o = overlap_matrix(uh)
    assert o.dtype == torch.float32 and torch.isfinite(o).all()
    assert torch.allclose(o.diagonal(), torch.ones(3), atol=2e-2)


def test_bad_arguments():
    u = torch.randn(3, 8, 2)
    with pytest.raises(UserError, match="3 dims"):
        overlap_matrix(u[0])
    with pytest.raises(UserError, match="different spaces"):
        subspace_overlap(torch.randn(8, 2), torch.randn(9, 2))
    with pytest.raises(UserError, match="at least 2"):
        mean_off_diagonal(torch.ones(1, 1))
    with pytest.raises(UserError, match="square"):
        mean_off_diagonal(torch.ones(2, 3))
    with pytest.raises(UserError):
        random_overlap_baseline(0, 8)
    with pytest.raises(UserError):
        random_overlap_baseline(9, 8)
    with pytest.raises(UserError):
        random_overlap_baseline(2, 0)
