"""Finding 1: experts' parameters share a dominant subspace.

Per layer and projection (gate, up, down; all with the hidden space R^D last):
- the E x E overlap of each expert's top-k singular subspace, its mean
  off-diagonal value, the random baseline k/D and the ratio to it;
- each expert's top singular values and the share of its energy ||W_i||_F^2
  they hold;
- each expert's energy inside the common subspace U (top-r of all experts
  stacked): ||W_i U||_F^2 / ||W_i||_F^2, against the baseline r/D.

Works on canonical weights, so the same code reads a live model
(`sdmoe.moe.find_moe_blocks` -> `weights_of_block`) and a checkpoint on disk
(`sdmoe.moe.checkpoint.ExpertCheckpoint.iter_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdmoe.errors import UserError
from sdmoe.moe.checkpoint import LayerWeights
from sdmoe.moe.projections import PROJECTIONS
from sdmoe.spectral import (
    common_subspace,
    expert_subspaces,
    mean_off_diagonal,
    overlap_matrix,
    random_overlap_baseline,
)

# Above this hidden size per-expert subspaces use randomized subspace
# iteration (E x D x (k+10) state) instead of E dense D x D eigendecompositions.
EXACT_MAX_D = 1024
# Power iterations of the randomized method. At real sizes the work is memory
# bound (each iteration reads the whole E x F x D stack twice); 2 iterations
# with 10 oversampling columns is the usual randomized-SVD setting.
RANDOMIZED_ITERS = 2


def choose_method(d: int, method: str = "auto") -> str:
    if method == "auto":
        return "gram" if d <= EXACT_MAX_D else "randomized"
    return method


def check_rank(k: int, d: int, name: str = "rank") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k >= d:
        raise UserError(
            f"{name}={k} does not fit hidden size D={d}; pass 1 <= {name} < {d} (e.g. --rank {max(1, d // 16)})"
        )
    return k


def top_singular_values(w_EFD: torch.Tensor, u_EDK: torch.Tensor) -> torch.Tensor:
    """Top-k singular values of each expert given its top-k right subspace (Ritz values) -> s_EK."""
    y = w_EFD.to(u_EDK.dtype) @ u_EDK  # E x F x K
    vals = torch.linalg.eigvalsh(y.transpose(1, 2) @ y)  # ascending
    return vals.flip(-1).clamp_min(0).sqrt()


def _share(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num)).clamp(0, 1)


@dataclass
class ProjectionFindings:
    """Finding 1 for one layer and projection."""

    layer: int
    projection: str
    k: int  # per-expert subspace rank
    r: int  # common subspace rank
    d: int
    method: str  # "gram" (exact) or "randomized" (subspace iteration)
    overlap: list[list[float]]  # E x E
    mean_overlap: float  # mean off-diagonal
    baseline: float  # k/d
    ratio: float  # mean_overlap / baseline
    singular_values: list[list[float]]  # E x k, top singular values, descending
    topk_energy: list[float]  # per expert, share of ||W_i||^2 in its top-k
    common_energy: list[float]  # per expert, ||W_i U||^2 / ||W_i||^2
    common_baseline: float  # r/d
    common_eigvals: list[float]  # r top eigenvalues of sum_i W_i^T W_i
    basis_DR: torch.Tensor | None = field(default=None, repr=False)  # U, kept for finding 3; not serialised

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "basis_DR"}


def projection_findings(
    w_EFD: torch.Tensor, k: int, r: int | None = None, layer: int = 0, projection: str = "gate", method: str = "auto"
) -> ProjectionFindings:
    """Finding 1 on one stack of expert matrices (E x F x D, hidden space last)."""
    e, _, d = w_EFD.shape
    if e < 2:
        raise UserError(f"layer {layer} has {e} expert; overlap needs at least 2 experts")
    check_rank(k, d)
    r = check_rank(r if r is not None else k, d, "common rank")
    method = choose_method(d, method)
    w = w_EFD.detach()
    if w.dtype not in (torch.float32, torch.float64) or not w.is_contiguous():
        # one pass: converted and contiguous (a transposed down projection otherwise stays strided)
        w = torch.empty(w.shape, dtype=torch.float32 if w.dtype != torch.float64 else w.dtype).copy_(w)
    it = {"iters": RANDOMIZED_ITERS} if method == "randomized" else {}
    u_EDK = expert_subspaces(w, k, method, **it)
    o_EE = overlap_matrix(u_EDK)
    mean = mean_off_diagonal(o_EE)
    base = random_overlap_baseline(k, d)
    sv = top_singular_values(w, u_EDK)
    total = w.pow(2).sum(dim=(1, 2))
    topk = _share(sv.pow(2).sum(-1), total)
    cmethod = "gram" if method == "svd" else method
    u_DR, eig = common_subspace(w, r, cmethod, **it)
    share = _share((w @ u_DR.to(w.dtype)).pow(2).sum(dim=(1, 2)), total)  # = energy_share(w, u_DR)
    return ProjectionFindings(
        layer=layer,
        projection=projection,
        k=k,
        r=r,
        d=d,
        method=method,
        overlap=o_EE.tolist(),
        mean_overlap=mean,
        baseline=base,
        ratio=mean / base,
        singular_values=sv.tolist(),
        topk_energy=topk.tolist(),
        common_energy=share.tolist(),
        common_baseline=r / d,
        common_eigvals=eig.tolist(),
        basis_DR=u_DR,
    )


def layer_findings(
    weights: LayerWeights, k: int, r: int | None = None, method: str = "auto", projections=PROJECTIONS
) -> list[ProjectionFindings]:
    """Finding 1 for every projection of one layer."""
    mats = weights.projections()
    return [projection_findings(mats[p], k, r, weights.layer, p, method) for p in projections]


def parameter_findings(layers, k: int, r: int | None = None, method: str = "auto", progress=None) -> list[ProjectionFindings]:
    """Finding 1 for an iterable of `LayerWeights` (consumed one layer at a time)."""
    out: list[ProjectionFindings] = []
    for lw in layers:
        out.extend(layer_findings(lw, k, r, method))
        if progress is not None:
            progress.update(1)
        del lw
    return out
