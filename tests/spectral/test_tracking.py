import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdmoe.errors import UserError
from sdmoe.spectral import SubspaceTracker, exact_top, subspace_error, subspace_overlap

from .spectral_helpers import make_gen, orthonormal

E, F, D, R = 4, 32, 64, 8


def _basis():
    return orthonormal(D, D, make_gen(0))


def _grads(basis, spectrum=None):
    """Gradients whose stacked spectrum is `spectrum` along the columns of `basis`
    (top R: 3..2, then 4 at 1.4, the rest 0.3; gap lambda_{R+1}/lambda_R = 0.49)."""
    if spectrum is None:
        spectrum = torch.cat([torch.linspace(3, 2, R), torch.full((4,), 1.4), torch.full((D - R - 4,), 0.3)])
    a = torch.randn(E, F, D, generator=make_gen(1)) / math.sqrt(E * F)
    return (a * spectrum) @ basis.T


def _rotation(theta):
    """Rotates each of the top R directions towards a bottom one by theta."""
    rot = torch.eye(D)
    c, s = math.cos(theta), math.sin(theta)
    for i in range(R):
        j = D - 1 - i
        rot[i, i] = rot[j, j] = c
        rot[i, j], rot[j, i] = -s, s
    return rot


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or any(a.alias_info for a in func._schema.returns):
            return out  # in-place ops and views allocate nothing new
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_first_update_is_exact():
    g = _grads(_basis())
    t = SubspaceTracker(R)
    assert t.q is None
    q = t.update(g)
    assert q.shape == (D, R)
    assert subspace_error(q, exact_top(g, R)) < 1e-5
    assert t.steps == 1 and torch.equal(t.q, q)


@pytest.mark.parametrize("oversample", [0, 4])
def test_converges_to_exact_on_fixed_gradients(oversample):
    g = _grads(_basis())
    exact = exact_top(g, R)
    t = SubspaceTracker(R, oversample=oversample)
    t.reset(torch.randn(D, R + oversample, generator=make_gen(2)))  # cold, random start
    errs = [subspace_error(t.update(g), exact) for _ in range(20)]
    assert errs[0] > 1e-2  # it did start far away
    assert errs[-1] < 1e-4
    assert torch.allclose(t.q.T @ t.q, torch.eye(R), atol=1e-5)


def test_oversampling_converges_faster():
    g = _grads(_basis())
    exact = exact_top(g, R)
    steps_to = {}
    for p in (0, 4):
        t = SubspaceTracker(R, oversample=p)
        t.reset(torch.randn(D, R + p, generator=make_gen(2)))
        n = 1
        while subspace_error(t.update(g), exact) > 1e-4:
            n += 1
        steps_to[p] = n
    # the 4 directions at 1.4 sit inside the oversampled block: the rate drops
    # from (1.4/2)^2 to (0.3/2)^2 per step
    assert steps_to[4] < steps_to[0]


def test_iters_per_update():
    g = _grads(_basis())
    exact = exact_top(g, R)
    q0 = torch.randn(D, R, generator=make_gen(2))
    one, three = SubspaceTracker(R, iters=1), SubspaceTracker(R, iters=3)
    one.reset(q0)
    three.reset(q0)
    for _ in range(3):
        one.update(g)
    assert subspace_error(three.update(g), exact) == pytest.approx(subspace_error(one.q, exact), abs=1e-6)


def test_tracks_slowly_rotating_gradients():
    basis = _basis()
    t = SubspaceTracker(R)
    stale = None
    errs = []
    for step in range(30):
        g = _grads(basis @ _rotation(0.02 * step))
        q = t.update(g)
        if stale is None:
            stale = q.clone()
        errs.append(subspace_error(q, exact_top(g, R)))
    assert max(errs) < 1e-4
    assert subspace_error(stale, exact_top(g, R)) > 0.1  # the subspace really moved (0.58 rad)


def test_zero_gradient_step_keeps_basis_and_dtypes():
    g = _grads(_basis())
    t = SubspaceTracker(R, oversample=2)
    q1 = t.update(g).clone()
    q2 = t.update(torch.zeros_like(g))
    assert torch.isfinite(q2).all()
    assert subspace_overlap(q1, q2) > 1 - 1e-5
    for dtype in (torch.float16, torch.bfloat16):
        q = t.update(g.to(dtype))
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        assert subspace_error(q, exact_top(g, R)) < 1e-3
    t64 = SubspaceTracker(R, dtype=torch.float64)
    assert t64.update(g).dtype == torch.float64


def test_rank_deficient_gradients():
    # rank 2 < R: finite, orthonormal, contains the range
    g = torch.randn(2, 1, D, generator=make_gen(3))
    t = SubspaceTracker(R, init="randomized")
    for _ in range(3):
        q = t.update(g)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.T @ q, torch.eye(R), atol=1e-5)
    assert subspace_overlap(exact_top(g, 2), q) > 1 - 1e-5


def test_transposed_down_gradients_match_contiguous():
    g_EDF = _grads(_basis()).transpose(1, 2).contiguous()
    g_view = g_EDF.transpose(1, 2)  # E x F x D view of a D x F layout
    a, b = SubspaceTracker(R), SubspaceTracker(R)
    q0 = torch.randn(D, R, generator=make_gen(4))
    a.reset(q0)
    b.reset(q0)
    with _MaxNumel() as mode:
        qa = a.update(g_view)
    assert mode.max_numel < g_view.numel()  # no copy of the gradient for the transposed layout
    assert subspace_error(qa, b.update(g_view.contiguous())) < 1e-6


@pytest.mark.parametrize("oversample", [0, 4])
def test_update_never_forms_d_by_d(oversample):
    d, e, f, r = 4096, 2, 8, 4
    gen = make_gen(5)
    u_true = torch.linalg.qr(torch.randn(d, r, generator=gen)).Q
    g = torch.randn(e, f, r, generator=gen) @ u_true.T + 1e-3 * torch.randn(e, f, d, generator=gen)
    t = SubspaceTracker(r, oversample=oversample, init="randomized")
    with _MaxNumel() as first:
        t.update(g)  # randomized init: no D x D either
    start = time.perf_counter()
    with _MaxNumel() as mode:
        for _ in range(5):
            q = t.update(g)
    per_update = (time.perf_counter() - start) / 5
    # largest tensors are D x (r + p [+ 10 for the randomized init]) and the gradient itself
    assert max(first.max_numel, mode.max_numel) <= max(e * f * d, d * (r + oversample + 10))
    assert per_update < 0.5  # an eigh of 4096 x 4096 alone takes seconds on 2 cores
    assert subspace_overlap(u_true, q) > 0.999  # planted rank-r common part found


def test_bad_arguments():
    g = torch.randn(2, 3, 8)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(UserError):
            SubspaceTracker(bad)
    with pytest.raises(UserError):
        SubspaceTracker(2, iters=0)
    with pytest.raises(UserError):
        SubspaceTracker(2, oversample=-1)
    with pytest.raises(UserError, match="init"):
        SubspaceTracker(2, init="svd")
    with pytest.raises(UserError, match="3 dims"):
        SubspaceTracker(2).update(g[0])
    with pytest.raises(UserError, match="out of range"):
        SubspaceTracker(9).update(g)
    t = SubspaceTracker(2)
    t.update(g)
    with pytest.raises(UserError, match="hidden size"):
        t.update(torch.randn(2, 3, 16))
    t.reset()
    assert t.q is None and t.update(torch.randn(2, 3, 16)).shape == (16, 2)
