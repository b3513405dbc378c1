"""Cheap per-step tracking of the common gradient subspace (training hot path).

Each training step needs the top-r eigenvectors of M = sum_i G_i^T G_i (D x D)
for the experts' gradients G_i (F x D). Computing them exactly costs
E F D^2 (forming M) + D^3 (eigh). `SubspaceTracker` instead keeps the last
basis Q and runs ``iters`` warm-started subspace iterations per step:

    Z = M Q = sum_i G_i^T (G_i Q)      two GEMMs, 4 E F D (r+p) flops, no D x D matrix
    Q, R = qr(Z)                       thin QR, D (r+p)^2

With oversampling p > 0 it tracks r + p columns and returns the best r after
a Rayleigh-Ritz step on the new block: the left singular vectors of
Z = Q R, i.e. an SVD of the small (r+p) x (r+p) factor R (the eigenvectors of
Q^T (M Q_prev Q_prev^T M) Q, so no extra pass over the gradients is needed).

Host-device syncs: none in `update` after the first call when the
Rayleigh-Ritz step is off (the default for ``oversample=0``): only GEMMs and
a QR run. The first call (exact init: eigh of M) and the Rayleigh-Ritz step
(small SVD, whose error check reads a flag on CUDA) synchronise once each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from sdmoe.errors import UserError

from ._util import check_nonneg_int, check_rank, check_tensor, compute_dtype
from .overlap import subspace_overlap
from .subspace import common_subspace

__all__ = ["SubspaceTracker", "exact_top", "gram_of", "next_basis", "per_projection", "subspace_error",
           "subspace_iteration"]

# Added as `_SHIFT * Q` to M Q: leaves any real gradient untouched (far below
# float32 resolution of M Q unless M Q itself is ~1e-23), but keeps Q in place
# instead of turning it into an arbitrary basis on a step with zero gradients.
_SHIFT = 1e-30


def per_projection(g: torch.Tensor | Sequence[torch.Tensor],
                   q: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """P projections' gradients as a list of (E, F, D) views, and q as (P, D, K).

    g: (E, F, D) with q (D, K); (E, P, F, D) with q (P, D, K); or a sequence of P (E, F, D) views (each
    may alias different storage: the gate and up halves of a fused tensor, a transposed down) with q
    (P, D, K). The views are read and written in place; nothing is copied. q may be None."""
    if isinstance(g, (list, tuple)):
        return list(g), q
    if g.ndim == 3:
        return [g], None if q is None else q.unsqueeze(0)
    return list(g.unbind(1)), q


@torch.no_grad()
def subspace_iteration(
    g: torch.Tensor | Sequence[torch.Tensor],
    q: torch.Tensor,
    iters: int = 1,
    rayleigh_ritz: bool = False,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Warm-started subspace iteration on M_p = sum_i G_ip^T G_ip: the one implementation.

    g: (E, F, D) with q (D, X), or P projections at once (`per_projection`: (E, P, F, D) or a sequence
    of P (E, F, D) views) with q (P, D, X). Strided views of g are read in place. Returns the new
    orthonormal Q (q's shape and dtype); with `rayleigh_ritz` its columns are ordered by an SVD of the
    small R factor, so the first r of an oversampled block are the best r. `reduce` sums M Q in place
    over the processes that hold the other experts (FSDP2) before the QR, so every process gets the
    same Q. One iteration: 4 E F D X flops per projection, one batched thin QR; no host sync.
    """
    gs, q_PDX = per_projection(g, q)
    for it in range(iters):
        z_PDX = torch.stack([_gram_times(g_p, q_p) for g_p, q_p in zip(gs, q_PDX.unbind(0))])  # M Q
        q_PDX = next_basis(z_PDX, q_PDX, rayleigh_ritz and it == iters - 1, reduce)
    return q_PDX if q.ndim == 3 else q_PDX[0]


@torch.no_grad()
def next_basis(z_PDX: torch.Tensor, q_PDX: torch.Tensor, rayleigh_ritz: bool = False,
               reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The orthonormal basis of one subspace-iteration step from Z = M Q (edited in place): reduce over
    processes, a thin QR (shifted by Q, so a step with zero gradients keeps Q), and with `rayleigh_ritz`
    the columns ordered by an SVD of the small R factor. (P, D, X) in and out."""
    if reduce is not None:
        reduce(z_PDX)
    with one_cpu_thread(z_PDX):
        q_new, r_fac = torch.linalg.qr(z_PDX.add_(q_PDX, alpha=_SHIFT), mode="reduced")
    if not rayleigh_ritz:
        return q_new
    with one_cpu_thread(r_fac):
        u_small = torch.linalg.svd(r_fac).U
    # all-zero gradients leave R = shift * I: the order is undefined there, so Q is kept (decided on device)
    live = r_fac.abs().amax(dim=(-1, -2), keepdim=True) > 1e3 * _SHIFT
    return torch.where(live, q_new @ u_small, q_new)


def _gram_times(g_EFD: torch.Tensor, q_DX: torch.Tensor) -> torch.Tensor:
    """sum_i G_i^T (G_i Q) -> (D, X) in q's dtype, never forming the D x D matrix.

    Q is broadcast over the experts as a stride-0 view, which bmm reads in place (torch.matmul's
    broadcasting would copy it once per expert); the batched GEMMs read strided views of G too."""
    qg = q_DX if q_DX.dtype == g_EFD.dtype else q_DX.to(g_EFD.dtype)
    y_EFX = torch.bmm(g_EFD, qg.expand(g_EFD.shape[0], -1, -1))
    return gram_of(g_EFD, y_EFX, q_DX.dtype)


def gram_of(g_EFD: torch.Tensor, y_EFX: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_i G_i^T Y_i -> (D, X) in `dtype`: M Q from the products Y_i = G_i Q already made."""
    z = torch.bmm(g_EFD.transpose(-1, -2), y_EFX).sum(0)
    return z if z.dtype == dtype else z.to(dtype)


@contextmanager
def one_cpu_thread(x: torch.Tensor) -> Iterator[None]:
    """Run a small CPU LAPACK call on one thread.

    A thin QR of a D x X block (128 x 32 in the lab model) is too small to share: with 2
    threads LAPACK spent 190 us on one where 1 thread takes 59 us (torch 2.13, 2 cores),
    about 1 ms of a lab-model step over 8 calls. Switching the intra-op thread count costs
    well under a microsecond."""
    n = torch.get_num_threads()
    if x.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def exact_top(g_EFD: torch.Tensor, r: int) -> torch.Tensor:
    """Exact top-r common subspace of the gradients (gram + eigh) -> u_DR."""
    return common_subspace(g_EFD, r, "gram")[0]


def subspace_error(q_DR: torch.Tensor, exact_DR: torch.Tensor) -> float:
    """1 - subspace_overlap(q, exact): 0 when the tracked subspace is exact, 1 when orthogonal."""
    return 1.0 - subspace_overlap(q_DR, exact_DR)


class SubspaceTracker:
    """Warm-started subspace iteration on M = sum_i G_i^T G_i, one step per `update`.

    Args:
        r: rank returned (1 <= r <= D).
        oversample: extra tracked columns p (r + p <= D is enforced by clipping p).
        iters: subspace iterations per update (>= 1).
        init: ``"exact"`` (first call: exact common_subspace, forms D x D once) or
            ``"randomized"`` (first call: randomized common_subspace, never D x D).
        rayleigh_ritz: order the tracked columns by a small SVD each update;
            default True iff ``oversample > 0`` (required to pick the best r of r + p).
        dtype: state/compute dtype; default float32 (float64 for float64 gradients).
        seed: seed of the randomized init.

    ``update(g_EFD)`` returns q_DR (orthonormal columns) and keeps the state;
    ``q`` is the last result; ``reset()`` forgets it, ``reset(q_DX)`` sets it.
    """

    def __init__(
        self,
        r: int,
        *,
        oversample: int = 0,
        iters: int = 1,
        init: str = "exact",
        rayleigh_ritz: bool | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise UserError(f"r must be a positive int, got {r!r}; pass the common rank, e.g. r=D//4")
        check_nonneg_int(oversample, "oversample", 0)
        check_nonneg_int(iters, "iters", 1)
        if init not in ("exact", "randomized"):
            raise UserError(f"unknown init {init!r}; pass 'exact' or 'randomized'")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise UserError(f"dtype={dtype} is not supported; pass torch.float32 or torch.float64")
        self.r = r
        self.oversample = oversample
        self.iters = iters
        self.init = init
        self.rayleigh_ritz = (oversample > 0) if rayleigh_ritz is None else bool(rayleigh_ritz)
        self.dtype = dtype
        self.seed = seed
        self.steps = 0
        self._q: torch.Tensor | None = None  # D x (r + p)

    @property
    def q(self) -> torch.Tensor | None:
        """The last returned basis (D x r), or None before the first update."""
        return None if self._q is None else self._q[:, : self.r]

    def reset(self, q_DX: torch.Tensor | None = None) -> None:
        """Forget the state (next update re-initialises), or start from a given basis.

        A given basis is orthonormalised; fewer than r + p columns are padded
        with a seeded Gaussian block.
        """
        self.steps = 0
        if q_DX is None:
            self._q = None
            return
        q_DX = check_tensor(q_DX, 2, "q_DX", "D x X")
        d = q_DX.shape[0]
        check_rank(self.r, d, "r")
        width = min(self.r + self.oversample, d)
        q = q_DX.to(compute_dtype(q_DX, self.dtype))[:, :width]
        if q.shape[1] < width:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            pad = torch.randn(d, width - q.shape[1], generator=gen, dtype=torch.float64)
            q = torch.cat([q, pad.to(device=q.device, dtype=q.dtype)], dim=1)
        self._q = torch.linalg.qr(q, mode="reduced").Q

    @torch.no_grad()
    def update(self, g_EFD: torch.Tensor) -> torch.Tensor:
        """One tracking step on this step's gradients (E x F x D; down projections transposed) -> q_DR."""
        g_EFD = check_tensor(g_EFD, 3, "g_EFD", "E x F x D")
        d = g_EFD.shape[-1]
        check_rank(self.r, d, "r")
        width = min(self.r + self.oversample, d)
        cdt = compute_dtype(g_EFD, self.dtype)
        g = g_EFD.to(cdt)
        if self._q is None:
            method = "gram" if self.init == "exact" else "randomized"
            self._q = common_subspace(g, width, method, seed=self.seed)[0]
        else:
            if self._q.shape[0] != d:
                raise UserError(f"g_EFD has hidden size {d} but the tracker holds D={self._q.shape[0]}; "
                                f"use one SubspaceTracker per projection")
            q = self._q.to(device=g.device, dtype=cdt)
            self._q = subspace_iteration(g, q, self.iters, self.rayleigh_ritz)
        self.steps += 1
        return self._q[:, : self.r]
