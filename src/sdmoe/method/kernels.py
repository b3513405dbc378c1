"""Hot-path linear algebra of the gradient split: batched, in place, no host syncs.

Every function takes canonical views x_EFD (hidden space last) that may be
strided views of the host's storage (a slice of a fused gate_up tensor, or the
transpose of a down tensor); edits land in the storage.

Why not `sdmoe.spectral.SubspaceTracker`: its basis lives in a Python
attribute, while SD-MoE keeps Q in a module buffer so that
`model.state_dict()` resumes a run bit-exactly; the iteration below is the
same algorithm (warm-started subspace iteration, M Q = sum_i G_i^T (G_i Q),
never forming the D x D matrix, thin QR, optional Rayleigh-Ritz via the small
R factor). TODO(spectral): switch to SubspaceTracker once it can run on an
external state tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Added as _SHIFT * Q to M Q (as sdmoe.spectral.tracking does): keeps Q in place on a
# step whose gradients are all zero instead of turning it into an arbitrary basis.
_SHIFT = 1e-30


def _hidden_last(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1


def coeffs(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x_i Q for every expert (and group) -> y (E, P, F, K) for x (E, P, F, D), q (P, D, K)."""
    return torch.matmul(x, q.to(x.dtype))


@torch.no_grad()
def track(g: torch.Tensor, q_buf: torch.Tensor, iters: int, r: int, rayleigh_ritz: bool,
          reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Warm-started subspace iteration on M_p = sum_i G_ip^T G_ip, for P projections at once.

    g: (E, P, F, D) gradients (strided views welcome); q_buf: (P, D, X), updated in place.
    reduce: sums M Q in place over the processes that hold the other experts (FSDP2), so
    the QR sees the whole sum and every process gets the same Q.
    Returns the top-r columns (P, D, r). One iteration: 4 E F D X flops per projection, one batched QR.
    """
    q = q_buf
    rf = None
    for _ in range(iters):
        y = coeffs(g, q)  # E x P x F x X
        z = torch.matmul(g.transpose(-1, -2), y).sum(0).to(q_buf.dtype)  # P x D x X  (= M Q)
        if reduce is not None:
            reduce(z)
        q, rf = torch.linalg.qr(z.add_(q, alpha=_SHIFT), mode="reduced")
    if rayleigh_ritz and q.shape[-1] > r:
        u_small = torch.linalg.svd(rf).U
        live = rf.abs().amax(dim=(-1, -2), keepdim=True) > 1e3 * _SHIFT
        q = torch.where(live, q @ u_small, q)
    q_buf.copy_(q)
    return q_buf[..., :r]


@torch.no_grad()
def project_out(x: torch.Tensor, q: torch.Tensor, normalize: bool = False) -> None:
    """x_ip <- x_ip (I - Q_p Q_p^T) in place; x (E, P, F, D) or (E, F, D) with q (P, D, R) or (D, R).

    normalize: rescale each x_ip to its Frobenius norm before the projection.
    """
    if x.ndim == 3:
        x, q = x.unsqueeze(1), q.unsqueeze(0)
    e, p = x.shape[:2]
    q = q.to(x.dtype)
    y = coeffs(x, q)  # E x P x F x R
    if normalize:
        full = x.square().sum((-1, -2))
        inside = y.square().sum((-1, -2))
    if _hidden_last(x):
        flat = x.flatten(0, 1)
        flat.baddbmm_(y.flatten(0, 1), q.transpose(-1, -2).expand(e, -1, -1, -1).flatten(0, 1), alpha=-1.0)
    else:  # a transposed view (down projection): edit the contiguous storage orientation
        flat = x.transpose(-1, -2).flatten(0, 1)
        flat.baddbmm_(q.expand(e, -1, -1, -1).flatten(0, 1), y.transpose(-1, -2).flatten(0, 1), alpha=-1.0)
    if normalize:
        rest = (full - inside).clamp_min(0.0)
        scale = torch.where(rest > 1e-12 * full, (full / rest.clamp_min(1e-30)).sqrt(), torch.ones_like(full))
        x.mul_(scale[..., None, None])


@torch.no_grad()
def keep_inside(x: torch.Tensor, q: torch.Tensor) -> None:
    """x_p <- x_p Q_p Q_p^T in place (the shared part's gradient); x (P, F, D) with q (P, D, R), or 2-D."""
    q = q.to(x.dtype)
    x.copy_((x @ q) @ q.transpose(-1, -2))


def drift(q_DR: torch.Tensor, exact_DR: torch.Tensor) -> torch.Tensor:
    """1 - ||Q^T Q_exact||_F^2 / r as a 0-dim tensor (no host sync)."""
    r = q_DR.shape[1]
    return 1.0 - (q_DR.T @ exact_DR.to(q_DR.dtype)).square().sum() / r
