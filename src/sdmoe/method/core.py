"""SD-MoE's concepts, one pure function each, on canonical tensors.

Canonical means hidden space last: every projection of every expert is an F x D
matrix (gate and up as stored, down transposed), so one basis in R^D serves all
three. The functions take views that may alias the host's storage (a gate or up
half of a fused gate_up tensor, the transpose of a down tensor) and edit them in
place; none of them reads a value back to the host (no device sync).

Legend of the shape letters in names: E experts (local ones under FSDP2), P
projections handled together, F expert ffn width, D hidden size, R common rank,
X tracked width (R + oversampling). A basis on the hidden side is q_PDR / u_DR; the
two-sided split adds one on the ffn side, f_PFR / u_FR (P_F = u_FR u_FR^T).

    paper concept                                   function
    -------------------------------------------------------------------------
    the common subspace, tracked every step         track_basis (spectral.subspace_iteration)
    the shared part at the split                    shared_at_split
    the shared part's gradient  sum_i G_i Q Q^T     shared_gradient
    the experts' tails' gradient  G_i (I - Q Q^T)   split_tails
      two-sided (the paper's): (I - P_F) G_i (I - P_D) to the tails, the rest to the shared part
    the shared update folded into every expert      fold_shared
    tails kept out of U after the optimizer step    project_tails
    W_i = C_i + T_i: the shared contribution C_i    shared_contribution

Forms of the shared part (`SDMoEConfig.form`): "full" keeps S (F x D), "lowrank"
keeps A (F x R) with C = A U^T, "per_expert" keeps A_i (E x F x R) with C_i = A_i U^T.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdmoe.spectral.tracking import subspace_iteration

__all__ = ["drift", "fold_shared", "keep_inside", "project_out", "project_tails", "shared_at_split",
           "shared_contribution", "shared_gradient", "split_tails", "track_basis"]


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Tensor.to costs a dispatch even when it is a no-op
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _grouped(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, P, F, D) and (P, D, K) views of x (E, F, D) or (E, P, F, D) and q (D, K) or (P, D, K)."""
    if x.ndim == 3:
        return x.unsqueeze(1), q.unsqueeze(0)
    return x, q


def _each(x_EFD: torch.Tensor, m_DK: torch.Tensor) -> torch.Tensor:
    """x_i m for every i -> (E, F, K); m broadcast as a stride-0 view that bmm reads in place."""
    return torch.bmm(x_EFD, m_DK.expand(x_EFD.shape[0], -1, -1))


# -- the basis ------------------------------------------------------------------------------------
@torch.no_grad()
def track_basis(g: torch.Tensor, q_buf: torch.Tensor, iters: int, r: int, rayleigh_ritz: bool,
                reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One tracking step of the experts' common gradient subspace, warm-started from q_buf.

    g: (E, P, F, D) gradients with q_buf (P, D, X), or (E, F, D) with (D, X). q_buf is updated
    in place; returns its top-r columns. See `sdmoe.spectral.subspace_iteration`."""
    q_buf.copy_(subspace_iteration(g, q_buf, iters, rayleigh_ritz and q_buf.shape[-1] > r, reduce))
    return q_buf[..., :r]


def drift(q_DR: torch.Tensor, exact_DR: torch.Tensor) -> torch.Tensor:
    """1 - ||Q^T Q_exact||_F^2 / r as a 0-dim tensor (no host sync): how far the tracker is from exact."""
    r = q_DR.shape[1]
    return 1.0 - (q_DR.T @ exact_DR.to(q_DR.dtype)).square().sum() / r


# -- the split ------------------------------------------------------------------------------------
@torch.no_grad()
def shared_at_split(w_EFD: torch.Tensor, u_DR: torch.Tensor | None, form: str) -> torch.Tensor:
    """The shared part from the experts' weights: S = mean_i W_i (full), A = mean_i W_i U (lowrank),
    A_i = W_i U (per_expert, exact)."""
    if form == "full":
        return w_EFD.mean(0)
    u = _as(u_DR, w_EFD)
    if form == "lowrank":
        return w_EFD.mean(0) @ u
    return w_EFD @ u


def shared_contribution(shared: torch.Tensor, u_DR: torch.Tensor, form: str) -> torch.Tensor:
    """C (F x D, or E x F x D per expert): the part of W_i the shared part stands for; T_i = W_i - C_i."""
    return shared if form == "full" else shared @ _as(u_DR, shared).T


@torch.no_grad()
def shared_gradient(g_EPFD: torch.Tensor, form: str, q_PDR: torch.Tensor | None,
                    reduce: Callable[[torch.Tensor], None] | None = None,
                    f_PFR: torch.Tensor | None = None) -> torch.Tensor:
    """The shared part's gradient, from the experts' whole gradients (before their tails are split).

    full: (sum_i G_i) Q Q^T, or the plain sum_i G_i when q is None (the control); two-sided (f
    given): sum_i G_i - (I - P_F)(sum_i G_i)(I - P_D) = P_F G + (I - P_F) G P_D, the paper's common
    update; lowrank: (sum_i G_i) U; per_expert: G_i U (E x P x F x R). `reduce` sums over the
    processes holding the other experts (FSDP2); a per-expert gradient needs none."""
    if form == "per_expert":
        q = _as(q_PDR, g_EPFD)
        return torch.einsum("epfd,pdr->epfr", g_EPFD, q)
    s_PFD = g_EPFD.sum(0)
    if reduce is not None:
        reduce(s_PFD)
    if form == "lowrank":
        return torch.bmm(s_PFD, _as(q_PDR, s_PFD))
    if f_PFR is not None:
        unique = s_PFD.clone().unsqueeze(0)
        split_tails(unique, q_PDR, f_PFR=f_PFR)
        return s_PFD.sub_(unique[0])
    if q_PDR is not None:
        keep_inside(s_PFD, q_PDR)
    return s_PFD


@torch.no_grad()
def split_tails(g_EPFD: torch.Tensor, q_PDR: torch.Tensor, normalize: bool = False,
                f_PFR: torch.Tensor | None = None) -> None:
    """The experts' gradients keep only their tails: G_i <- G_i (I - Q Q^T), or two-sided (f given)
    (I - P_F) G_i (I - Q Q^T), in place.

    normalize: rescale each projected gradient to its whole gradient's Frobenius norm."""
    if f_PFR is None:
        project_out(g_EPFD, q_PDR, normalize)
        return
    full = g_EPFD.square().sum((-1, -2)) if normalize else None
    project_out(g_EPFD, q_PDR)
    project_rows_out(g_EPFD, f_PFR)
    if normalize:
        rest = g_EPFD.square().sum((-1, -2))
        scale = torch.where(rest > 1e-12 * full, (full / rest.clamp_min(1e-30)).sqrt(), torch.ones_like(full))
        g_EPFD.mul_(scale[..., None, None])


@torch.no_grad()
def fold_shared(w_EFD: torch.Tensor, step: torch.Tensor, u_DR: torch.Tensor, form: str) -> None:
    """The shared part's optimizer step, added to every expert: W_i += dS (full), dA U^T (lowrank),
    dA_i U^T (per_expert). In place."""
    w_EFD.add_(shared_contribution(_as(step, w_EFD), u_DR, form))


@torch.no_grad()
def project_tails(w_EFD: torch.Tensor, c: torch.Tensor, u_DR: torch.Tensor, u_FR: torch.Tensor | None = None) -> None:
    """Keep the tails T_i = W_i - C_i out of U: W_i <- W_i - (W_i - C_i) U U^T, in place; two-sided
    (u_FR given): W_i <- C_i + (I - P_F) T_i (I - P_D).

    (AdamW's elementwise scaling and weight decay leak the tails back into U; the fixed split
    and the per-expert form re-project after every optimizer step.)"""
    u = _as(u_DR, w_EFD)
    t_EFD = w_EFD - c
    if u_FR is None:
        w_EFD.sub_(_each(_each(t_EFD, u), u.T))
        return
    unique = t_EFD.clone()
    project_out(unique, u)
    project_rows_out(unique, _as(u_FR, w_EFD))
    w_EFD.sub_(t_EFD.sub_(unique))


# -- the kernels under them -------------------------------------------------------------------------
def _hidden_last(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1


@torch.no_grad()
def project_out(x: torch.Tensor, q: torch.Tensor, normalize: bool = False) -> None:
    """x_ip <- x_ip (I - Q_p Q_p^T) in place; x (E, P, F, D) or (E, F, D) with q (P, D, R) or (D, R)."""
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
def project_rows_out(x: torch.Tensor, f: torch.Tensor) -> None:
    """x_ip <- (I - F_p F_p^T) x_ip in place (the ffn side); x (E, P, F, D) or (E, F, D) with f (P, F, R) or (F, R)."""
    x, f = _grouped(x, f)
    f = _as(f, x)
    e = x.shape[0]
    for p in range(x.shape[1]):
        x_EFD, f_FR = x[:, p], f[p]
        y_ERD = torch.bmm(f_FR.T.expand(e, -1, -1), x_EFD)
        x_EFD.sub_(torch.bmm(f_FR.expand(e, -1, -1), y_ERD))


@torch.no_grad()
def keep_inside(x: torch.Tensor, q: torch.Tensor) -> None:
    """x_p <- x_p Q_p Q_p^T in place; x (P, F, D) with q (P, D, R), or 2-D."""
    q = _as(q, x)
    if x.ndim == 2:
        x, q = x.unsqueeze(0), q.unsqueeze(0)
    inner_PFR = torch.bmm(x, q)
    if x.is_contiguous():
        torch.bmm(inner_PFR, q.transpose(-1, -2), out=x)
    elif x.transpose(-1, -2).is_contiguous():  # a down view
        torch.bmm(q, inner_PFR.transpose(-1, -2), out=x.transpose(-1, -2))
    else:
        x.copy_(torch.bmm(inner_PFR, q.transpose(-1, -2)))

