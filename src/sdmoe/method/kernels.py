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

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# Added as _SHIFT * Q to M Q (as sdmoe.spectral.tracking does): keeps Q in place on a
# step whose gradients are all zero instead of turning it into an arbitrary basis.
_SHIFT = 1e-30


def _hidden_last(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Tensor.to costs a dispatch even when it is a no-op
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _grouped(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, P, F, D) and (P, D, K) views of x (E, F, D) or (E, P, F, D) and q (D, K) or (P, D, K)."""
    if x.ndim == 3:
        return x.unsqueeze(1), q.unsqueeze(0)
    return x, q


def _each(x_EFD: torch.Tensor, m_DK: torch.Tensor) -> torch.Tensor:
    """x_i m for every i -> (E, F, K).

    m is broadcast over the experts as a stride-0 view, which bmm reads in place;
    torch.matmul's broadcasting would copy it once per expert first.
    """
    return torch.bmm(x_EFD, m_DK.expand(x_EFD.shape[0], -1, -1))


@torch.no_grad()
def track(g: torch.Tensor, q_buf: torch.Tensor, iters: int, r: int, rayleigh_ritz: bool,
          reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Warm-started subspace iteration on M_p = sum_i G_ip^T G_ip, for P projections at once.

    g: (E, P, F, D) gradients (strided views welcome), q_buf: (P, D, X); or g (E, F, D), q_buf (D, X).
    q_buf is updated in place. Returns its top-r columns (P, D, r) (or (D, r)).
    reduce: sums M Q in place over the processes that hold the other experts (FSDP2), so
    the QR sees the whole sum and every process gets the same Q.
    One iteration: 4 E F D X flops per projection, one batched QR.
    """
    g_EPFD, q = _grouped(g, q_buf)
    rf = None
    for _ in range(iters):
        z = torch.stack([_gram_times(g_EPFD[:, p], q[p]) for p in range(q.shape[0])])  # P x D x X (= M Q)
        if reduce is not None:
            reduce(z)
        with _one_cpu_thread(z):
            q, rf = torch.linalg.qr(z.add_(q, alpha=_SHIFT), mode="reduced")
    if rayleigh_ritz and q.shape[-1] > r:
        with _one_cpu_thread(rf):  # X x X
            u_small = torch.linalg.svd(rf).U
        live = rf.abs().amax(dim=(-1, -2), keepdim=True) > 1e3 * _SHIFT
        q = torch.where(live, q @ u_small, q)
    q_buf.copy_(q.view(q_buf.shape))
    return q_buf[..., :r]


@contextmanager
def _one_cpu_thread(x: torch.Tensor) -> Iterator[None]:
    """Run a small CPU LAPACK call on one thread.

    A thin QR of a D x X block (128 x 32 in the lab model) is too small to share: with 2
    threads LAPACK spent 190 us on one where 1 thread takes 59 us (torch 2.13, this
    machine), about 1 ms of a lab-model step over 8 calls. Switching the intra-op
    thread count costs well under a microsecond.
    """
    n = torch.get_num_threads()
    if x.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gram_times(g_EFD: torch.Tensor, q_DX: torch.Tensor) -> torch.Tensor:
    """sum_i G_i^T (G_i Q) -> (D, X) in q's dtype, never forming the D x D matrix."""
    y_EFX = _each(g_EFD, _as(q_DX, g_EFD))
    return _as(torch.bmm(g_EFD.transpose(-1, -2), y_EFX).sum(0), q_DX)


@torch.no_grad()
def project_out(x: torch.Tensor, q: torch.Tensor, normalize: bool = False) -> None:
    """x_ip <- x_ip (I - Q_p Q_p^T) in place; x (E, P, F, D) or (E, F, D) with q (P, D, R) or (D, R).

    normalize: rescale each x_ip to its Frobenius norm before the projection.
    """
    x, q = _grouped(x, q)
    q = _as(q, x)
    # One projection at a time: in a training step that measured faster (lab model: 1.5 against 1.8 ms a
    # step) than one (E P)-batched update, which needs Q^T copied per expert.
    for p in range(x.shape[1]):
        _project_out_one(x[:, p], q[p], normalize)


def _project_out_one(x_EFD: torch.Tensor, q_DR: torch.Tensor, normalize: bool) -> None:
    e = x_EFD.shape[0]
    y_EFR = _each(x_EFD, q_DR)
    if normalize:
        full = x_EFD.square().sum((-1, -2))
        inside = y_EFR.square().sum((-1, -2))
    # x -= y Q^T, in place, in whichever orientation has the contiguous rows (a down view is transposed)
    if x_EFD.is_contiguous():
        x_EFD.baddbmm_(y_EFR, q_DR.T.expand(e, -1, -1), alpha=-1.0)
    elif _hidden_last(x_EFD):
        # a gate or up half of a fused gradient (experts 2F rows apart): an in-place baddbmm_ on it runs
        # expert by expert; one batched product into a temporary, then one subtraction, gave the same
        # numbers (bit for bit, torch 2.13 CPU) in 41 instead of 63 us (lab model, 2 threads)
        x_EFD.sub_(torch.bmm(y_EFR, q_DR.T.expand(e, -1, -1)))
    else:
        x_EFD.transpose(-1, -2).baddbmm_(q_DR.expand(e, -1, -1), y_EFR.transpose(-1, -2), alpha=-1.0)
    if normalize:
        rest = (full - inside).clamp_min(0.0)
        scale = torch.where(rest > 1e-12 * full, (full / rest.clamp_min(1e-30)).sqrt(), torch.ones_like(full))
        x_EFD.mul_(scale[:, None, None])


@torch.no_grad()
def keep_inside(x: torch.Tensor, q: torch.Tensor) -> None:
    """x_p <- x_p Q_p Q_p^T in place (the shared part's gradient); x (P, F, D) with q (P, D, R), or 2-D."""
    q = _as(q, x)
    if x.ndim == 2:
        x, q = x.unsqueeze(0), q.unsqueeze(0)
    inner_PFR = torch.bmm(x, q)
    # written straight into x's storage (no P x F x D temporary), in the orientation whose rows are contiguous
    if x.is_contiguous():
        torch.bmm(inner_PFR, q.transpose(-1, -2), out=x)
    elif x.transpose(-1, -2).is_contiguous():  # a down view
        torch.bmm(q, inner_PFR.transpose(-1, -2), out=x.transpose(-1, -2))
    else:
        x.copy_(torch.bmm(inner_PFR, q.transpose(-1, -2)))


def drift(q_DR: torch.Tensor, exact_DR: torch.Tensor) -> torch.Tensor:
    """1 - ||Q^T Q_exact||_F^2 / r as a 0-dim tensor (no host sync)."""
    r = q_DR.shape[1]
    return 1.0 - (q_DR.T @ exact_DR.to(q_DR.dtype)).square().sum() / r
