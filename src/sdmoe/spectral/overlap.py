"""Subspace overlap s(P, Q) = ||P^T Q||_F^2 / k in [0, 1].

The mean squared cosine of the principal angles between two k-dim subspaces
of R^D given by orthonormal bases. Two independent uniformly random k-dim
subspaces give k/D in expectation (`random_overlap_baseline`).
"""

from __future__ import annotations

import torch

from sdmoe.errors import UserError

from ._util import check_rank, check_tensor
from .subspace import expert_subspaces

__all__ = ["subspace_overlap", "overlap_matrix", "mean_off_diagonal", "mean_expert_overlap", "random_overlap_baseline"]


def _as_compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def subspace_overlap(p_DK: torch.Tensor, q_DK: torch.Tensor) -> float:
    """||P^T Q||_F^2 / k for orthonormal bases P (D x k) and Q (D x k').

    With different ranks, k = min(k, k') so the value stays in [0, 1]
    (1 when the smaller subspace lies inside the larger). Clamped to [0, 1]
    against round-off. The k x k' product is accumulated in float64 so that
    1 - overlap (`subspace_error`) resolves errors far below float32 epsilon.
    """
    p_DK = check_tensor(p_DK, 2, "p_DK", "D x K")
    q_DK = check_tensor(q_DK, 2, "q_DK", "D x K")
    if p_DK.shape[0] != q_DK.shape[0]:
        raise UserError(f"bases live in different spaces: D={p_DK.shape[0]} vs D={q_DK.shape[0]}; "
                        f"pass two D x K bases of the same hidden size")
    k = min(p_DK.shape[1], q_DK.shape[1])
    c = p_DK.double().T @ q_DK.to(device=p_DK.device, dtype=torch.float64)
    return float((c.pow(2).sum() / k).clamp(0.0, 1.0))


def overlap_matrix(u_EDK: torch.Tensor) -> torch.Tensor:
    """Pairwise overlaps of E bases (E x D x K) -> o_EE (diagonal = 1 for orthonormal bases).

    One (E*K) x (E*K) Gram product of all basis vectors, squared and summed per block.
    """
    u_EDK = check_tensor(u_EDK, 3, "u_EDK", "E x D x K")
    e, d, k = u_EDK.shape
    u = _as_compute(u_EDK)
    u_DX = u.permute(1, 0, 2).reshape(d, e * k)
    g = u_DX.T @ u_DX
    return (g.pow(2).reshape(e, k, e, k).sum(dim=(1, 3)) / k).clamp(0.0, 1.0)


def mean_off_diagonal(o_EE: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square E x E matrix (E >= 2)."""
    o_EE = check_tensor(o_EE, 2, "o_EE", "E x E")
    e = o_EE.shape[0]
    if o_EE.shape[1] != e:
        raise UserError(f"o_EE must be square, got shape {tuple(o_EE.shape)}; pass the output of overlap_matrix")
    if e < 2:
        raise UserError("mean_off_diagonal needs at least 2 experts, got 1; pass an E x E matrix with E >= 2")
    o = _as_compute(o_EE)
    off = o.sum() - o.diagonal().sum()
    return float(off / (e * (e - 1)))


def mean_expert_overlap(w_EFD: torch.Tensor, k: int, method: str = "gram", **subspace_kw) -> float:
    """Mean off-diagonal overlap of the E experts' top-k right singular subspaces (E >= 2): the one
    number the monitors log per layer and projection. `method` and `subspace_kw` (oversample, iters,
    seed, dtype) go to `expert_subspaces`; computed as it computes (float32, float64 for float64 input)."""
    return mean_off_diagonal(overlap_matrix(expert_subspaces(w_EFD, k, method, **subspace_kw)))


def random_overlap_baseline(k: int, d: int) -> float:
    """Expected overlap of two independent uniformly random k-dim subspaces of R^d: k/d."""
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise UserError(f"d must be a positive int, got {d!r}; pass the hidden size")
    check_rank(k, d)
    return k / d
