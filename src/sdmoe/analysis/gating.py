"""Finding 3: the router reads mostly the data's dominant directions.

Per layer:
- alignment of each router row w_e: ||P w_e||^2 / ||w_e||^2 with P the
  projector on (a) the top-k eigenvectors of the layer input's E[x x^T] and
  (b) each projection's common expert subspace U (top-r of all experts);
  baselines k/D and r/D (a random direction);
- routing agreement: how often the top-k expert set chosen from x projected
  onto the top-k data directions equals the set chosen from the full x
  (exact-match share and mean Jaccard overlap), beside the same agreement for
  a random k-dim projection (the control). Computed on plain top-k of the
  router logits x W_r^T (routers with score-correction biases or group
  limits decide slightly differently; the comparison is like for like).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdmoe.errors import UserError
from sdmoe.spectral import projected_share


@dataclass
class GatingFindings:
    layer: int
    k: int
    d: int
    top_k: int
    data_alignment: list[float]  # per router row, share in the top-k data subspace
    data_alignment_mean: float
    data_baseline: float  # k/d
    common_alignment: dict[str, list[float]]  # projection -> per router row, share in its common subspace
    common_alignment_mean: dict[str, float]
    common_baseline: float  # r/d
    n_tokens: int
    agreement_exact: float  # share of tokens with the same top-k set, data projection vs full x
    agreement_jaccard: float
    random_agreement_exact: float  # the same with a random k-dim projection
    random_agreement_jaccard: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _topk_sets(x_TD: torch.Tensor, router_ED: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k membership mask (T x E) of the router logits."""
    logits = x_TD @ router_ED.T
    idx = logits.topk(top_k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)


def routing_agreement(x_TD: torch.Tensor, router_ED: torch.Tensor, u_DK: torch.Tensor, top_k: int) -> tuple[float, float]:
    """(exact-match share, mean Jaccard) of top-k sets from x U U^T against those from x."""
    if x_TD.shape[0] == 0:
        return float("nan"), float("nan")
    x = x_TD.float()
    w = router_ED.float()
    u = u_DK.float()
    full = _topk_sets(x, w, top_k)
    proj = _topk_sets((x @ u) @ u.T, w, top_k)
    inter = (full & proj).sum(-1).float()
    union = (full | proj).sum(-1).float()
    exact = float((inter == top_k).float().mean())
    jacc = float((inter / union).mean())
    return exact, jacc


def _random_basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    # offset: a caller seeding its own data with `seed` must not get the same directions
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen)).Q


def gating_findings(
    router_ED: torch.Tensor,
    data_basis_DK: torch.Tensor,
    common_bases: dict[str, torch.Tensor] | None = None,
    x_TD: torch.Tensor | None = None,
    top_k: int = 2,
    layer: int = 0,
    seed: int = 0,
) -> GatingFindings:
    """Finding 3 for one layer: router rows against the data and common subspaces, and routing agreement."""
    if router_ED is None:
        raise UserError(f"layer {layer} has no router weight (E x D); cannot measure gating alignment")
    e, d = router_ED.shape
    if data_basis_DK.shape[0] != d:
        raise UserError(f"router has hidden size {d} but the data basis has {data_basis_DK.shape[0]}; pass bases of the same layer")
    if not 1 <= top_k <= e:
        raise UserError(f"top_k={top_k} does not fit {e} experts; pass 1 <= top_k <= {e}")
    k = data_basis_DK.shape[1]
    w = router_ED.detach().float()
    data = projected_share(w, data_basis_DK.float())
    common = {p: projected_share(w, u.float()) for p, u in (common_bases or {}).items()}
    r = next(iter(common_bases.values())).shape[1] if common_bases else k
    x = x_TD if x_TD is not None else torch.zeros(0, d)
    exact, jacc = routing_agreement(x, w, data_basis_DK, top_k)
    rexact, rjacc = routing_agreement(x, w, _random_basis(d, k, seed), top_k)
    return GatingFindings(
        layer=layer,
        k=k,
        d=d,
        top_k=top_k,
        data_alignment=data.tolist(),
        data_alignment_mean=float(data.mean()),
        data_baseline=k / d,
        common_alignment={p: v.tolist() for p, v in common.items()},
        common_alignment_mean={p: float(v.mean()) for p, v in common.items()},
        common_baseline=r / d,
        n_tokens=int(x.shape[0]),
        agreement_exact=exact,
        agreement_jaccard=jacc,
        random_agreement_exact=rexact,
        random_agreement_jaccard=rjacc,
    )
