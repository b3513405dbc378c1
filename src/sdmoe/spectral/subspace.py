"""Top singular subspaces in the hidden space R^D.

Convention: every matrix handed in has its LAST dim = D (hidden). For a stack
of F x D matrices (gate/up) the subspace is spanned by right singular vectors
(rows of V^T). Callers transpose down projections (D x F) to F x D first.

Methods
- ``"gram"``: eigenvectors of W^T W (D x D). Exact up to float round-off; the
  Gram matrix squares the condition number, which only matters for directions
  with singular values below ~1e-4 of the largest (float32).
- ``"randomized"``: subspace iteration on M = W^T W from a seeded Gaussian
  start, M Q applied as W^T (W Q) (never forming M), ``k + oversample``
  columns, ``iters`` applications of M, then a Rayleigh-Ritz step (eigh of
  Q^T M Q) to pick and order the top k. Accuracy depends on the spectral gap
  at k; see the benchmark and tests.
- ``"svd"``: reference via torch.linalg.svd (``top_subspace`` and
  ``expert_subspaces`` only; never a dense SVD of a stacked matrix).

All functions compute in float32 (float64 when the input is float64 or
``dtype=torch.float64``), also for bf16/fp16 inputs, work on any device, and
return bases with deterministic column signs (largest-magnitude entry of each
column positive). An all-zero matrix has a zero spectrum: eigenvalues 0 and a
deterministic (but arbitrary) orthonormal basis, never NaN. For rank-deficient
input (rank < k) the columns beyond the rank are an arbitrary orthonormal
completion orthogonal to the range.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from sdmoe.errors import UserError

from ._util import (
    check_nonneg_int,
    check_rank,
    check_tensor,
    compute_dtype,
    fix_signs,
    gram_apply,
    top_eigh,
)

__all__ = ["top_subspace", "expert_subspaces", "common_subspace"]

_METHODS = ("gram", "randomized", "svd")


def _check_method(method: str, allowed: Sequence[str]) -> str:
    if method not in allowed:
        raise UserError(f"unknown method {method!r}; pass one of {', '.join(repr(m) for m in allowed)}")
    return method


def _gaussian(shape, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Seeded Gaussian start, drawn on the CPU so it is identical on every device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _subspace_iteration(
    apply_m: Callable[[torch.Tensor], torch.Tensor],
    ritz: Callable[[torch.Tensor], torch.Tensor],
    q0: torch.Tensor,
    k: int,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block power iteration Q <- qr(M Q), then Rayleigh-Ritz with H = ritz(Q) = Q^T M Q."""
    q = torch.linalg.qr(q0, mode="reduced").Q
    for _ in range(iters):
        q = torch.linalg.qr(apply_m(q), mode="reduced").Q
    vecs, vals = top_eigh(ritz(q), k)
    return q @ vecs, vals


def _randomized_batched(w_BFD: torch.Tensor, k: int, oversample: int, iters: int, seed: int):
    """Per-matrix randomized top-k right subspaces for w of shape (..., F, D)."""
    d = w_BFD.shape[-1]
    q = min(k + oversample, d)
    q0 = _gaussian((*w_BFD.shape[:-2], d, q), seed, w_BFD)
    wt = w_BFD.transpose(-1, -2)

    def ritz(qq):
        y = w_BFD @ qq
        return y.transpose(-1, -2) @ y

    return _subspace_iteration(lambda qq: wt @ (w_BFD @ qq), ritz, q0, k, iters)


def _randomized_common(w_EFD: torch.Tensor, k: int, oversample: int, iters: int, seed: int,
                       reduce: Callable[[torch.Tensor], None] | None = None):
    """Top-k eigenpairs of sum_i W_i^T W_i by subspace iteration, M Q = sum_i W_i^T (W_i Q)."""
    d = w_EFD.shape[-1]
    q = min(k + oversample, d)
    q0 = _gaussian((d, q), seed, w_EFD)

    def summed(x: torch.Tensor) -> torch.Tensor:
        if reduce is not None:
            reduce(x)
        return x

    def ritz(qq):
        _, y = gram_apply(w_EFD, qq)
        y = y.reshape(-1, y.shape[-1])
        return summed(y.T @ y)

    return _subspace_iteration(lambda qq: summed(gram_apply(w_EFD, qq)[0]), ritz, q0, k, iters)


def _check_randomized(oversample: int, iters: int) -> None:
    check_nonneg_int(oversample, "oversample", 0)
    check_nonneg_int(iters, "iters", 1)


def top_subspace(
    w_FD: torch.Tensor,
    k: int,
    method: str = "gram",
    *,
    oversample: int = 10,
    iters: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Top-k right singular subspace (in R^D) of one F x D matrix -> u_DK.

    ``k`` may exceed F (1 <= k <= D); the extra columns complete the basis.
    ``oversample``/``iters``/``seed`` only affect ``method="randomized"``.
    """
    w_FD = check_tensor(w_FD, 2, "w_FD", "F x D")
    # One matrix is the one-expert case of the batched routine.
    return expert_subspaces(w_FD.unsqueeze(0), k, method, oversample=oversample, iters=iters, seed=seed,
                            dtype=dtype)[0]


def expert_subspaces(
    w_EFD: torch.Tensor,
    k: int,
    method: str = "gram",
    *,
    oversample: int = 10,
    iters: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Top-k right singular subspace of every expert, batched -> u_EDK.

    ``"gram"`` runs one batched eigh of the E Gram matrices (memory E*D*D);
    ``"randomized"`` keeps only E x D x (k+oversample) state.
    """
    w_EFD = check_tensor(w_EFD, 3, "w_EFD", "E x F x D")
    d = w_EFD.shape[-1]
    check_rank(k, d)
    _check_method(method, _METHODS)
    w = w_EFD.to(compute_dtype(w_EFD, dtype))
    if method == "gram":
        u, _ = top_eigh(w.transpose(-1, -2) @ w, k)
    elif method == "svd":
        full = k > min(w.shape[-2:])
        u = torch.linalg.svd(w, full_matrices=full).Vh[:, :k].transpose(-1, -2)
    else:
        _check_randomized(oversample, iters)
        u, _ = _randomized_batched(w, k, oversample, iters, seed)
    return fix_signs(u)


def common_subspace(
    w_EFD: torch.Tensor,
    r: int,
    method: str = "gram",
    weights=None,
    *,
    oversample: int = 10,
    iters: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Common subspace of all experts -> (u_DR, eigvals_R).

    The top-r right singular vectors of the stacked [W_1; ...; W_E] (E*F x D),
    computed as the top eigenvectors of M = sum_i w_i W_i^T W_i (D x D), never
    by a dense SVD of the stack. ``eigvals_R`` are M's top eigenvalues (the
    stack's squared singular values), descending, >= 0.

    ``weights``: optional non-negative per-expert weights (length E), e.g.
    expert load. ``"randomized"`` applies M Q = sum_i W_i^T (W_i Q) without
    forming M. ``reduce``: an in-place sum over the processes holding the other experts
    (`sdmoe.method.sharding.reducer`), applied to every sum over experts.
    """
    w_EFD = check_tensor(w_EFD, 3, "w_EFD", "E x F x D")
    e, _, d = w_EFD.shape
    check_rank(r, d, "r")
    _check_method(method, ("gram", "randomized"))
    cdt = compute_dtype(w_EFD, dtype)
    w = w_EFD.to(cdt)
    if weights is not None:
        wt = torch.as_tensor(weights, dtype=cdt, device=w.device)
        if wt.shape != (e,):
            raise UserError(f"weights must have one entry per expert (E={e}), got shape {tuple(wt.shape)}; "
                            f"pass a length-{e} sequence")
        if bool((wt < 0).any()) or not bool(torch.isfinite(wt).all()):
            raise UserError("weights must be finite and non-negative; pass e.g. expert load shares")
        w = w * wt.sqrt()[:, None, None]
    if method == "gram":
        w2 = w.reshape(-1, d)
        m_DD = w2.T @ w2
        if reduce is not None:
            reduce(m_DD)
        u, vals = top_eigh(m_DD, r)
    else:
        _check_randomized(oversample, iters)
        u, vals = _randomized_common(w, r, oversample, iters, seed, reduce)
    return fix_signs(u), vals
