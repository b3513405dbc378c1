"""Degenerate expert stacks: zero, duplicated, rank-deficient experts, fp16/bf16 weights.

`sdmoe.spectral`, Finding 1 (`sdmoe.analysis.parameters`) and the exact
per-expert split (`sdmoe.method.convert`) must stay finite and correct, or
raise a clear UserError.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdmoe import spectral
from sdmoe.analysis.parameters import projection_findings
from sdmoe.errors import UserError

E, F, D, K = 4, 8, 12, 3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _stack(kind: str, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, F, D, generator=g)
    if kind == "zero":
        w = torch.zeros(E, F, D)
    elif kind == "one_zero_expert":
        w[1] = 0
    elif kind == "duplicated":
        w[1] = w[0]
        w[3] = w[2]
    elif kind == "rank1":  # every expert rank 1 < K
        w = torch.randn(E, F, 1, generator=g) @ torch.randn(E, 1, D, generator=g)
    elif kind == "shared_rank2":  # all experts inside one 2-dim subspace
        basis = torch.linalg.qr(torch.randn(D, 2, generator=g)).Q
        w = torch.randn(E, F, 2, generator=g) @ basis.T
    return w.to(dtype)


KINDS = ["random", "zero", "one_zero_expert", "duplicated", "rank1", "shared_rank2"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _finite(*xs):
    for x in xs:
        assert torch.isfinite(torch.as_tensor(x, dtype=torch.float64)).all()


def _orthonormal(u_XDK):
    eye = torch.eye(u_XDK.shape[-1], dtype=torch.float64)
    assert torch.allclose(u_XDK.double().transpose(-1, -2) @ u_XDK.double(), eye.expand_as(u_XDK.transpose(-1, -2) @ u_XDK).double(), atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_spectral_functions_stay_finite_and_orthonormal(kind, dtype):
    w = _stack(kind, dtype)
    u = spectral.expert_subspaces(w, K)
    u_common, vals = spectral.common_subspace(w, K)
    o = spectral.overlap_matrix(u)
    _finite(u, u_common, vals, o, spectral.energy_share(w, u_common), spectral.singular_values(w),
            spectral.lowrank_share(w, K))
    assert u.dtype == torch.float32  # half inputs are computed in float32
    _orthonormal(u)
    _orthonormal(u_common[None])
    assert (vals >= 0).all() and (o >= 0).all() and (o <= 1).all()
    assert torch.allclose(o.diagonal(), torch.ones(E), atol=1e-4)
    share = spectral.energy_share(w, u_common)
    if kind == "zero":
        assert (share == 0).all() and (vals == 0).all()
    if kind == "one_zero_expert":
        assert share[1] == 0
    if kind == "shared_rank2":  # the common top-3 contains the whole 2-dim span
        assert torch.allclose(share, torch.ones(E), atol=1e-2)
    if kind == "duplicated":
        assert o[0, 1] == pytest.approx(1.0, abs=1e-3) and o[2, 3] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_matches_float32(kind):
    ref = spectral.common_subspace(_stack(kind).to(torch.bfloat16).float(), K)[1]
    for dtype in (torch.float16, torch.bfloat16):
        got = spectral.common_subspace(_stack(kind).to(dtype), K)[1]
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3) if dtype == torch.bfloat16 else torch.isfinite(got).all()


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_findings_are_finite_and_json_safe(kind, dtype, method):
    f = projection_findings(_stack(kind, dtype), K, K, method=method)
    for x in (f.overlap, f.singular_values, f.topk_energy, f.common_energy, f.common_eigvals, f.mean_overlap, f.ratio):
        _finite(x)
    assert all(0 <= v <= 1 for v in f.topk_energy + f.common_energy)
    if kind == "zero":
        assert f.topk_energy == [0.0] * E and f.common_energy == [0.0] * E
    if kind == "rank1":  # one direction holds all the energy of each expert
        assert f.topk_energy == pytest.approx([1.0] * E, abs=1e-3)
    if kind == "duplicated":
        assert f.overlap[0][1] == pytest.approx(1.0, abs=1e-3)


def test_spectral_rejects_nonsense_clearly():
    for call, fragment in [
        (lambda: spectral.expert_subspaces(torch.zeros(E, F, D), D + 1), "out of range"),
        (lambda: spectral.expert_subspaces(torch.zeros(E, 0, D), 1), "empty dimension"),
        (lambda: spectral.expert_subspaces(torch.zeros(E, F, D, dtype=torch.int64), 1), "floating"),
        (lambda: projection_findings(torch.zeros(1, F, D), K), "at least 2 experts"),
    ]:
        with pytest.raises(UserError, match=fragment):
            call()


# -- the exact per-expert split on degenerate experts -------------------------------


def _model(dtype=torch.float32):
    from sdmoe.models import ModelConfig, build_model

    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=1, num_heads=2, num_experts=E, top_k=2, expert_ffn=16)
    return build_model(cfg, 64, seed=0).eval().to(dtype)


def _experts(model):
    return model.model.layers[0].mlp.experts  # fused: gate_up_proj (E, 2F, D), down_proj (E, D, F)


def _degenerate(model, kind):
    ex = _experts(model)
    with torch.no_grad():
        if kind == "zero":
            ex.gate_up_proj.zero_()
            ex.down_proj.zero_()
        elif kind == "one_zero_expert":
            ex.gate_up_proj[1] = 0
            ex.down_proj[1] = 0
        elif kind == "duplicated":
            ex.gate_up_proj[1] = ex.gate_up_proj[0]
            ex.down_proj[1] = ex.down_proj[0]
        elif kind == "rank1":
            gu, dn = ex.gate_up_proj, ex.down_proj
            gu.copy_(gu[:, :, :1] @ gu[:, :1, :])  # (E, 2F, 1) @ (E, 1, D): rank 1 per expert
            dn.copy_(dn[:, :, :1] @ dn[:, :1, :])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "zero", "one_zero_expert", "duplicated", "rank1"])
def test_per_expert_convert_is_exact_and_finite_on_degenerate_experts(kind, dtype):
    from sdmoe.method import SDMoEConfig, convert, export

    model = _model(dtype)
    _degenerate(model, kind)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    convert(model, SDMoEConfig(form="per_expert", rank=8))
    with torch.no_grad():
        during = model(input_ids=ids).logits.float()
    export(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    tol = 1e-4 if dtype == torch.float32 else (5e-2 if dtype == torch.float16 else 2e-1)
    assert torch.isfinite(during).all() and torch.isfinite(after).all()
    assert (during - before).abs().max() <= tol
    assert (after - before).abs().max() <= tol
    assert not math.isnan(float(after.sum()))
