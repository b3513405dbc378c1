import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.spectral import (
    common_subspace,
    expert_subspaces,
    subspace_error,
    subspace_overlap,
    top_subspace,
)

from .spectral_helpers import make_gen, orthonormal, planted_stack, with_spectrum


def _is_orthonormal(u, tol=1e-5):
    eye = torch.eye(u.shape[-1], dtype=u.dtype)
    return torch.allclose(u.transpose(-1, -2) @ u, eye.expand_as(u.transpose(-1, -2) @ u), atol=tol)


def test_gram_svd_randomized_agree_on_decaying_spectrum():
    gen = make_gen(1)
    s = 0.8 ** torch.arange(24, dtype=torch.float64)  # gap s_{k+1}/s_k = 0.8 everywhere
    w, _ = with_spectrum(32, 48, s, gen)
    k = 6
    u_svd = top_subspace(w, k, "svd")
    u_gram = top_subspace(w, k, "gram")
    u_rand = top_subspace(w, k, "randomized")
    assert u_gram.shape == (48, k) and _is_orthonormal(u_gram)
    assert subspace_error(u_gram, u_svd) < 1e-4
    # randomized: k+10 columns, 3 applications of M: error ~ (s_{k+p+1}/s_k)^(4*3) ~ 0.8^120 -> float round-off.
    assert subspace_error(u_rand, u_svd) < 1e-4
    # deterministic signs: the same vectors, not just the same span
    assert torch.allclose(u_gram, u_svd, atol=1e-3)


def test_top_subspace_recovers_planted_and_k_above_f():
    gen = make_gen(2)
    s = torch.tensor([10.0, 8.0, 6.0, 0.05])
    w, right = with_spectrum(4, 20, s, gen)
    u = top_subspace(w, 3)
    assert subspace_overlap(u, right[:, :3]) > 1 - 1e-6
    # k > F: basis completed, still orthonormal and finite, contains the range
    for method in ("gram", "svd", "randomized"):
        u8 = top_subspace(w, 8, method)
        assert u8.shape == (20, 8) and torch.isfinite(u8).all() and _is_orthonormal(u8)
        assert subspace_overlap(right, u8) > 1 - 1e-5


def test_gram_resolution_limit_is_documented_behaviour():
    # Gram squares singular values: in float32 a direction with s < ~1e-4 * s_max
    # drowns in round-off of the largest eigenvalue; float64 (dtype=...) resolves it.
    gen = make_gen(2)
    w, right = with_spectrum(4, 20, torch.tensor([10.0, 8.0, 6.0, 1e-3]), gen)
    u32 = top_subspace(w, 4, "gram")
    u64 = top_subspace(w.double(), 4, "gram")
    assert subspace_error(u64, right.double()) < 1e-8
    assert subspace_error(u32[:, :3], right[:, :3]) < 1e-5  # the resolved part is still exact


def test_expert_subspaces_batched_matches_per_expert():
    gen = make_gen(3)
    w = torch.randn(5, 12, 16, generator=gen) * torch.logspace(0, -2, 16)  # anisotropic columns -> clear gaps
    u = expert_subspaces(w, 4)
    assert u.shape == (5, 16, 4)
    for i in range(5):
        assert subspace_error(u[i], top_subspace(w[i], 4, "svd")) < 1e-4
    u_svd = expert_subspaces(w, 4, "svd")
    u_rand = expert_subspaces(w, 4, "randomized", iters=6)
    for i in range(5):
        assert subspace_error(u_svd[i], u[i]) < 1e-4
        assert subspace_error(u_rand[i], u[i]) < 1e-3


def test_common_subspace_recovers_planted():
    gen = make_gen(4)
    w, u_true = planted_stack(e=8, f=16, d=64, r=6, noise=1e-2, gen=gen)
    for method in ("gram", "randomized"):
        u, vals = common_subspace(w, 6, method)
        assert u.shape == (64, 6) and vals.shape == (6,)
        assert subspace_overlap(u, u_true) > 0.99
        assert bool((vals[:-1] >= vals[1:]).all())
    # eigenvalues are the stack's squared singular values
    s = torch.linalg.svdvals(w.reshape(-1, 64).double())[:6] ** 2
    _, vals = common_subspace(w, 6)
    assert torch.allclose(vals.double(), s, rtol=1e-4)
    u_g, _ = common_subspace(w, 6, "gram")
    u_r, _ = common_subspace(w, 6, "randomized")
    assert subspace_error(u_r, u_g) < 1e-5


def test_common_subspace_equals_dense_svd_of_stack():
    gen = make_gen(5)
    w = torch.randn(4, 10, 24, generator=gen) * torch.logspace(0, -1.5, 24)
    vh = torch.linalg.svd(w.reshape(-1, 24).double(), full_matrices=False).Vh
    u, _ = common_subspace(w, 5, dtype=torch.float64)
    assert u.dtype == torch.float64
    assert subspace_error(u, vh[:5].T) < 1e-10


def test_common_subspace_weights():
    gen = make_gen(6)
    w1, u1 = planted_stack(1, 16, 32, 3, 0.0, gen)
    w2, u2 = planted_stack(1, 16, 32, 3, 0.0, gen)
    w = torch.cat([w1, w2])
    u, _ = common_subspace(w, 3, weights=[1.0, 0.0])
    assert subspace_overlap(u, u1) > 1 - 1e-5
    u, _ = common_subspace(w, 3, weights=torch.tensor([0.0, 2.0]))
    assert subspace_overlap(u, u2) > 1 - 1e-5
    with pytest.raises(UserError, match="one entry per expert"):
        common_subspace(w, 3, weights=[1.0])
    with pytest.raises(UserError, match="non-negative"):
        common_subspace(w, 3, weights=[1.0, -1.0])


def test_rank_deficient_duplicated_and_zero_experts():
    gen = make_gen(7)
    w, u_true = planted_stack(e=3, f=2, d=16, r=2, noise=0.0, gen=gen)  # stack rank 2 < r
    for method in ("gram", "randomized"):
        u, vals = common_subspace(w, 10, method)
        assert torch.isfinite(u).all() and torch.isfinite(vals).all() and _is_orthonormal(u)
        assert subspace_overlap(u_true, u[:, :2]) > 1 - 1e-5
        assert bool((vals >= 0).all()) and float(vals[2:].max()) < 1e-4 * float(vals[0])
    # duplicated experts: same common subspace as one copy
    dup = torch.cat([w[:1]] * 4)
    assert subspace_error(common_subspace(dup, 2)[0], top_subspace(w[0], 2, "svd")) < 1e-5
    # zero experts do not change the common subspace
    zero_padded = torch.cat([w, torch.zeros(2, 2, 16)])
    assert subspace_error(common_subspace(zero_padded, 2)[0], common_subspace(w, 2)[0]) < 1e-6


@pytest.mark.parametrize("method", ["gram", "randomized", "svd"])
def test_all_zero_input_gives_zero_spectrum_and_deterministic_basis(method):
    z = torch.zeros(3, 4, 8)
    u = expert_subspaces(z, 3, method)
    assert torch.isfinite(u).all() and _is_orthonormal(u)
    assert torch.equal(u, expert_subspaces(z, 3, method))
    if method != "svd":
        u_c, vals = common_subspace(z, 3, method)
        assert torch.isfinite(u_c).all() and _is_orthonormal(u_c)
        assert torch.equal(vals, torch.zeros(3))
        assert torch.equal(u_c, common_subspace(z, 3, method)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    gen = make_gen(8)
    w, u_true = planted_stack(e=4, f=8, d=32, r=4, noise=1e-2, gen=gen)
    wh = w.to(dtype)
    u, vals = common_subspace(wh, 4)
    assert u.dtype == torch.float32 and vals.dtype == torch.float32
    assert torch.isfinite(u).all()
    assert subspace_error(u, common_subspace(wh.float(), 4)[0]) < 1e-6
    assert subspace_overlap(u, u_true) > 0.99
    assert expert_subspaces(wh, 2).dtype == torch.float32
    assert top_subspace(wh[0], 2, "randomized").dtype == torch.float32


def test_transposed_down_projection_input():
    gen = make_gen(9)
    w_EDF = torch.randn(3, 16, 6, generator=gen)
    w_EFD = w_EDF.transpose(1, 2)  # non-contiguous view, as callers pass down projections
    ref = common_subspace(w_EFD.contiguous(), 4)[0]
    for method in ("gram", "randomized"):
        assert subspace_error(common_subspace(w_EFD, 4, method, iters=8)[0], ref) < 1e-4


def test_bad_arguments_raise_user_error():
    w = torch.randn(2, 3, 8)
    for bad_k in (0, -1, 9, 2.0, True):
        with pytest.raises(UserError):
            common_subspace(w, bad_k)
        with pytest.raises(UserError):
            top_subspace(w[0], bad_k)
    with pytest.raises(UserError, match="3 dims"):
        common_subspace(w[0], 2)
    with pytest.raises(UserError, match="2 dims"):
        top_subspace(w, 2)
    with pytest.raises(UserError, match="3 dims"):
        expert_subspaces(w[0], 2)
    with pytest.raises(UserError, match="unknown method"):
        top_subspace(w[0], 2, "qr")
    with pytest.raises(UserError, match="unknown method"):
        common_subspace(w, 2, "svd")  # never a dense SVD of the stack
    with pytest.raises(UserError, match="floating"):
        common_subspace(torch.ones(2, 3, 8, dtype=torch.long), 2)
    with pytest.raises(UserError, match="iters"):
        common_subspace(w, 2, "randomized", iters=0)
    with pytest.raises(UserError):
        common_subspace(w, 2, dtype=torch.float16)
    # one line, as the CLI prints it
    with pytest.raises(UserError) as info:
        common_subspace(w, 0)
    assert "\n" not in str(info.value) and ";" in str(info.value)


def test_orthonormal_helper_sanity():
    # guards the helper the other tests rely on
    q = orthonormal(10, 3, make_gen(0))
    assert _is_orthonormal(q)
