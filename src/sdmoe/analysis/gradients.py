"""Finding 2: experts' gradients are aligned and low-rank, because the data is.

Per layer and projection, on the causal-LM loss's gradient of each expert
summed over a few batches of real text:
- the E x E overlap of each expert's top-k gradient subspace (in R^D), its
  mean off-diagonal value over experts that received gradient, baseline k/D;
- each gradient's low-rankness: share of ||G_i||_F^2 in its top-r singular values.
Per layer, on the layer input x (what every expert and the router read):
- the eigen-spectrum of E[x x^T] and the share of its trace in the top-k
  eigenvalues (baseline k/D for isotropic data), plus the effective rank
  exp(entropy of the normalised eigenvalues).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sdmoe.analysis.capture import LayerCapture, capture
from sdmoe.analysis.parameters import RANDOMIZED_ITERS, check_rank, choose_method
from sdmoe.moe.projections import PROJECTIONS
from sdmoe.spectral import (
    data_subspace,
    expert_subspaces,
    lowrank_share,
    mean_off_diagonal,
    overlap_matrix,
    random_overlap_baseline,
)


@dataclass
class GradientFindings:
    """Finding 2 (gradients) for one layer and projection."""

    layer: int
    projection: str
    k: int
    r: int
    d: int
    overlap: list[list[float]]  # E x E (rows/cols of experts without gradient are 0)
    mean_overlap: float  # mean off-diagonal over experts with gradient (nan if < 2)
    baseline: float
    ratio: float
    active_experts: list[int]  # experts that received gradient
    grad_norms: list[float]  # ||G_i||_F
    lowrank_share: list[float]  # share of ||G_i||^2 in top-r singular values
    lowrank_baseline: float  # r / min(F, D): share of an isotropic (flat-spectrum) matrix

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DataSpectrum:
    """Finding 2 (data) for one layer: the spectrum of E[x x^T] of the layer input."""

    layer: int
    k: int
    d: int
    n_tokens: int
    eigvals: list[float]  # all D, descending
    topk_share: float  # share of the trace in the top-k eigenvalues
    baseline: float  # k/D
    effective_rank: float  # exp(entropy of eigvals / trace)
    basis_DK: torch.Tensor | None = field(default=None, repr=False)  # top-k eigenvectors, for finding 3

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "basis_DK"}


def gradient_overlap(g_EFD: torch.Tensor, k: int, r: int, layer: int = 0, projection: str = "gate") -> GradientFindings:
    """Finding 2 on one stack of expert gradients (E x F x D, hidden space last)."""
    e, f, d = g_EFD.shape
    check_rank(k, d)
    check_rank(r, d, "common rank")
    g = g_EFD.detach().float()
    norms = g.pow(2).sum(dim=(1, 2)).sqrt()
    active = [i for i in range(e) if float(norms[i]) > 0]
    o = torch.zeros(e, e)
    mean = float("nan")
    if active:
        method = choose_method(d)
        sub = g[active]
        it = {"iters": RANDOMIZED_ITERS} if method == "randomized" else {}
        u = expert_subspaces(sub, k, method, **it)
        o_AA = overlap_matrix(u)
        idx = torch.tensor(active)
        o[idx[:, None], idx[None, :]] = o_AA
        if len(active) >= 2:
            mean = mean_off_diagonal(o_AA)
    base = random_overlap_baseline(k, d)
    return GradientFindings(
        layer=layer,
        projection=projection,
        k=k,
        r=r,
        d=d,
        overlap=o.tolist(),
        mean_overlap=mean,
        baseline=base,
        ratio=mean / base,
        active_experts=active,
        grad_norms=norms.tolist(),
        lowrank_share=lowrank_share(g, r).tolist(),
        lowrank_baseline=min(1.0, r / min(f, d)),
    )


def data_spectrum(c_DD: torch.Tensor, k: int, layer: int = 0, n_tokens: int = 0) -> DataSpectrum:
    """Finding 2 (data) from a second-moment matrix E[x x^T] (D x D)."""
    d = c_DD.shape[0]
    check_rank(k, d)
    vals = torch.linalg.eigvalsh(c_DD.double()).flip(0).clamp_min(0)
    total = float(vals.sum())
    p = vals / total if total > 0 else vals
    nz = p[p > 0]
    eff = float(torch.exp(-(nz * nz.log()).sum())) if total > 0 else 0.0
    u, _ = data_subspace(c_DD, k)
    return DataSpectrum(
        layer=layer,
        k=k,
        d=d,
        n_tokens=n_tokens,
        eigvals=vals.tolist(),
        topk_share=float(vals[:k].sum() / total) if total > 0 else 0.0,
        baseline=k / d,
        effective_rank=eff,
        basis_DK=u,
    )


def findings_from_capture(
    caps: dict[int, LayerCapture], k: int, r: int | None = None
) -> tuple[list[GradientFindings], list[DataSpectrum]]:
    grads, data = [], []
    for layer, cap in sorted(caps.items()):
        data.append(data_spectrum(cap.moment.matrix, k, layer, cap.moment.count))
        if cap.grads is not None:
            for p in PROJECTIONS:
                grads.append(gradient_overlap(cap.grads[p], k, r or k, layer, p))
    return grads, data


def gradient_findings(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    k: int,
    r: int | None = None,
    layers: list[int] | None = None,
    domain_ids: Sequence[torch.Tensor] | None = None,
) -> tuple[list[GradientFindings], list[DataSpectrum]]:
    """Finding 2 on a live model over `batches` of token ids (one forward+backward each)."""
    caps = capture(model, batches, domain_ids, layers, with_grads=True)
    return findings_from_capture(caps, k, r)
