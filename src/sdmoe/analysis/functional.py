"""Functional signs of (missing) specialisation, next to the spectra.

Per layer, from the router's decisions on real text:
- load: share of routing slots each expert receives (sums to 1);
- normalised load entropy H(load) / log E (1 = perfectly balanced, 0 = one expert);
- de facto shared experts: load > 2/E (twice a fair share);
- co-activation: C[i, j] = share of tokens that chose both i and j (diagonal:
  share of tokens that chose i);
- expert output cosine similarity: every expert run on the same sample of the
  layer's inputs, mean cosine of their outputs per pair (1 = interchangeable);
- with domain labels: mutual information I(expert; domain) in nats over
  routing slots, and normalised by min(H(expert), H(domain)) (0 = routing
  says nothing about the domain, 1 = as much as it can).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdmoe.errors import UserError
from sdmoe.spectral import mean_off_diagonal


@dataclass
class FunctionalFindings:
    layer: int
    num_experts: int
    top_k: int
    n_tokens: int
    load: list[float]  # E, sums to 1
    load_entropy: float  # normalised, in [0, 1]
    shared_experts: list[int]  # load > 2/E
    coactivation: list[list[float]]  # E x E
    output_cosine: list[list[float]] | None  # E x E, None without sample inputs
    output_cosine_mean: float | None  # mean off-diagonal
    domains: list[str] | None = None
    domain_mi_nats: float | None = None
    domain_mi_normalized: float | None = None
    domain_load: list[list[float]] | None = None  # n_domains x E, each row sums to 1

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def expert_outputs(x_TD: torch.Tensor, gate_EFD, up_EFD, down_EDF) -> torch.Tensor:
    """Every expert's SwiGLU output on the same tokens -> y_ETD."""
    x = x_TD.float()
    h = F.silu(torch.einsum("td,efd->etf", x, gate_EFD.float())) * torch.einsum("td,efd->etf", x, up_EFD.float())
    return torch.einsum("etf,edf->etd", h, down_EDF.float())


def output_cosine(x_TD: torch.Tensor, gate_EFD, up_EFD, down_EDF) -> torch.Tensor:
    """Mean over tokens of the cosine between experts' outputs -> c_EE."""
    y = F.normalize(expert_outputs(x_TD, gate_EFD, up_EFD, down_EDF), dim=-1)  # E x T x D
    return torch.einsum("itd,jtd->ij", y, y) / max(1, x_TD.shape[0])


def mutual_information(experts_N: torch.Tensor, domains_N: torch.Tensor, num_experts: int, num_domains: int):
    """(I(expert; domain) in nats, normalised, joint counts n_domains x E) over N routing slots."""
    joint = torch.zeros(num_domains, num_experts, dtype=torch.float64)
    joint.index_put_((domains_N.long(), experts_N.long()), torch.ones(len(experts_N), dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    pd, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pd @ pe)[nz]).log()).sum())
    h = min(_entropy(pd.flatten()), _entropy(pe.flatten()))
    return max(0.0, mi), (max(0.0, mi) / h if h > 0 else 0.0), joint


def functional_findings(
    indices_TK: torch.Tensor,
    num_experts: int,
    layer: int = 0,
    token_domains: torch.Tensor | None = None,
    domain_names: list[str] | None = None,
    weights=None,
    sample_TD: torch.Tensor | None = None,
) -> FunctionalFindings:
    """Load, entropy, shared experts, co-activation, output similarity and domain MI for one layer.

    `indices_TK`: each token's chosen experts; `weights`: the layer's
    `LayerWeights` (for output similarity on `sample_TD`).
    """
    if indices_TK.ndim != 2 or indices_TK.shape[0] == 0:
        raise UserError(f"layer {layer}: no routing decisions recorded; run at least one batch through the model")
    t, top_k = indices_TK.shape
    e = num_experts
    if int(indices_TK.max()) >= e or int(indices_TK.min()) < 0:
        raise UserError(f"layer {layer}: routed expert ids outside 0..{e - 1}; pass the layer's expert count")
    mask = torch.zeros(t, e, dtype=torch.float64).scatter_(1, indices_TK.long(), 1.0)
    counts = mask.sum(0)
    load = counts / counts.sum()
    entropy = _entropy(load) / math.log(e) if e > 1 else 0.0
    coact = mask.T @ mask / t
    cos, cos_mean = None, None
    if weights is not None and sample_TD is not None and sample_TD.shape[0]:
        c = output_cosine(sample_TD, weights.gate_EFD, weights.up_EFD, weights.down_EDF)
        cos = c.tolist()
        cos_mean = mean_off_diagonal(c) if e > 1 else None
    out = FunctionalFindings(
        layer=layer,
        num_experts=e,
        top_k=top_k,
        n_tokens=t,
        load=load.tolist(),
        load_entropy=max(0.0, min(1.0, entropy)),
        shared_experts=[i for i in range(e) if float(load[i]) > 2.0 / e],
        coactivation=coact.tolist(),
        output_cosine=cos,
        output_cosine_mean=cos_mean,
    )
    if token_domains is not None and token_domains.numel() == t:
        n_dom = len(domain_names) if domain_names else int(token_domains.max()) + 1
        slots_dom = token_domains.long().repeat_interleave(top_k)
        mi, nmi, joint = mutual_information(indices_TK.reshape(-1), slots_dom, e, n_dom)
        rows = joint / joint.sum(1, keepdim=True).clamp_min(1)
        out.domains = list(domain_names) if domain_names else [str(i) for i in range(n_dom)]
        out.domain_mi_nats = mi
        out.domain_mi_normalized = nmi
        out.domain_load = rows.tolist()
    return out
