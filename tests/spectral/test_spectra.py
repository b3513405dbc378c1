import math

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.spectral import (
    SecondMoment,
    common_subspace,
    data_subspace,
    energy_share,
    lowrank_share,
    projected_share,
    second_moment,
    singular_values,
    subspace_error,
)

from .spectral_helpers import make_gen, orthonormal, planted_stack, with_spectrum


def test_energy_share_planted_and_random():
    gen = make_gen(0)
    e, f, d, r = 16, 32, 64, 8
    wp, u_true = planted_stack(e, f, d, r, 1e-2, gen)
    u, _ = common_subspace(wp, r)
    share = energy_share(wp, u)
    assert share.shape == (e,)
    assert bool((share > 0.99).all())
    # Gaussian experts vs an independent random U: ||W U||^2/||W||^2 ~ Beta(F r/2, F (d-r)/2),
    # mean r/d, sd sqrt((r/d)(1-r/d)/(F d/2)) = 0.0103 per expert; mean of E experts within 5 sd/sqrt(E).
    w = torch.randn(e, f, d, generator=gen)
    share = energy_share(w, orthonormal(d, r, gen))
    sd = math.sqrt((r / d) * (1 - r / d) / (f * d / 2))
    assert abs(float(share.mean()) - r / d) < 5 * sd / math.sqrt(e)


def test_energy_share_zero_expert_and_half_precision():
    gen = make_gen(1)
    w, u = planted_stack(3, 8, 16, 2, 0.0, gen)
    w = torch.cat([w, torch.zeros(1, 8, 16)])
    share = energy_share(w.to(torch.bfloat16), u)
    assert share.dtype == torch.float32 and torch.isfinite(share).all()
    assert float(share[-1]) == 0.0
    assert bool((share[:3] > 0.99).all())


def test_singular_values_and_lowrank_share():
    gen = make_gen(2)
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    w, _ = with_spectrum(6, 10, s, gen)
    sv = singular_values(torch.stack([w, 2 * w]))
    assert sv.shape == (2, 6)
    assert torch.allclose(sv[0, :4], s, atol=1e-5) and torch.allclose(sv[1, :4], 2 * s, atol=1e-5)
    assert float(sv[:, 4:].abs().max()) < 1e-5
    g = torch.stack([w, torch.zeros(6, 10)])
    share = lowrank_share(g, 2)
    assert float(share[0]) == pytest.approx(20.0 / 21.25, abs=1e-5)
    assert float(share[1]) == 0.0  # all-zero gradient: no energy, not NaN
    assert float(lowrank_share(g, 8)[0]) == pytest.approx(1.0, abs=1e-6)  # r >= rank
    assert torch.isfinite(lowrank_share(g.to(torch.float16), 2)).all()


def test_second_moment_accumulator_matches_one_shot():
    gen = make_gen(3)
    x = torch.randn(3, 7, 12, generator=gen)  # B x S x D
    acc = SecondMoment()
    for b in range(3):
        acc.update(x[b].to(torch.bfloat16) if b == 1 else x[b])
    assert acc.count == 21
    ref = x.clone()
    ref[1] = ref[1].to(torch.bfloat16).float()
    c = second_moment(ref)
    assert c.dtype == torch.float64 and c.shape == (12, 12)
    assert torch.allclose(acc.matrix, c, atol=1e-12)
    with pytest.raises(UserError, match="no tokens"):
        SecondMoment().matrix
    with pytest.raises(UserError, match="hidden size"):
        acc.update(torch.randn(2, 5))


def test_router_rows_planted_in_data_subspace():
    gen = make_gen(4)
    t, d, k = 2000, 48, 6
    b = orthonormal(d, k, gen)
    x = (torch.randn(t, k, generator=gen) * 3) @ b.T + 0.05 * torch.randn(t, d, generator=gen)
    acc = SecondMoment()
    for chunk in x.split(500):
        acc.update(chunk)
    u, vals = data_subspace(acc.matrix, k)
    assert u.dtype == torch.float64 and vals.shape == (k,)
    assert subspace_error(u.float(), b) < 1e-3
    router_planted = torch.randn(8, k, generator=gen) @ b.T + 1e-3 * torch.randn(8, d, generator=gen)
    assert bool((projected_share(router_planted, u) > 0.99).all())
    # random rows against a fixed k-dim subspace: share ~ Beta(k/2, (d-k)/2), mean k/d, sd ~0.045
    router_random = torch.randn(64, d, generator=gen)
    share = projected_share(router_random, u)
    assert abs(float(share.mean()) - k / d) < 5 * 0.045 / math.sqrt(64)
    zero_row = projected_share(torch.zeros(2, d), u)
    assert torch.equal(zero_row, torch.zeros(2, dtype=zero_row.dtype))


def test_data_subspace_rank_deficient_and_zero():
    u, vals = data_subspace(torch.zeros(8, 8, dtype=torch.float64), 3)
    assert torch.isfinite(u).all() and torch.equal(vals, torch.zeros(3, dtype=torch.float64))
    x = torch.randn(100, 2, generator=make_gen(5)) @ torch.randn(2, 8, generator=make_gen(6))
    u, vals = data_subspace(second_moment(x), 5)
    assert torch.isfinite(u).all() and bool((vals >= 0).all())
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=u.dtype), atol=1e-10)


def test_bad_arguments():
    with pytest.raises(UserError, match="token dimension"):
        second_moment(torch.randn(8))
    with pytest.raises(UserError, match="square"):
        data_subspace(torch.randn(4, 5), 2)
    with pytest.raises(UserError):
        data_subspace(torch.eye(4), 5)
    with pytest.raises(UserError, match="hidden size"):
        energy_share(torch.randn(2, 3, 8), torch.randn(9, 2))
    with pytest.raises(UserError, match="hidden size"):
        projected_share(torch.randn(3, 8), torch.randn(9, 2))
    with pytest.raises(UserError):
        lowrank_share(torch.randn(2, 3, 8), 0)
    with pytest.raises(UserError, match="3 dims"):
        singular_values(torch.randn(3, 8))
