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
    both at once, from the same products G_i Q      split_gradient
      two-sided (the paper's): (I - P_F) G_i (I - P_D) to the tails, the rest to the shared part
    the shared update folded into every expert      fold_shared
    tails kept out of U after the optimizer step    project_tails
    W_i = C_i + T_i: the shared contribution C_i    shared_contribution

Forms of the shared part (`SDMoEConfig.form`): "full" keeps S (F x D), "lowrank"
keeps A (F x R) with C = A U^T, "per_expert" keeps A_i (E x F x R) with C_i = A_i U^T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sdmoe.spectral.tracking import per_projection, subspace_iteration

# The experts' gradients of P projections: (E, P, F, D), one projection's (E, F, D), or a sequence of P
# (E, F, D) views that alias the host's storage (`sdmoe.spectral.per_projection`).
Grads = torch.Tensor | Sequence[torch.Tensor]

__all__ = ["add_to_experts", "drift", "fold_shared", "keep_inside", "project_out", "project_tails", "shared_at_split",
           "shared_contribution", "shared_gradient", "split_gradient", "split_tails", "track_basis"]


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Tensor.to costs a dispatch even when it is a no-op
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _each(x_EFD: torch.Tensor, m_DK: torch.Tensor) -> torch.Tensor:
    """x_i m for every i -> (E, F, K); m broadcast as a stride-0 view that bmm reads in place."""
    return torch.bmm(x_EFD, m_DK.expand(x_EFD.shape[0], -1, -1))


# -- the basis ------------------------------------------------------------------------------------
@torch.no_grad()
def track_basis(g: Grads, q_buf: torch.Tensor, iters: int, r: int, rayleigh_ritz: bool,
                reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One tracking step of the experts' common gradient subspace, warm-started from q_buf.

    g: P projections' gradients (`Grads`) with q_buf (P, D, X), or (E, F, D) with (D, X). q_buf is updated
    in place; returns its top-r columns. See `sdmoe.spectral.subspace_iteration`."""
    q_buf.copy_(subspace_iteration(g, q_buf, iters, rayleigh_ritz and q_buf.shape[-1] > r, reduce))
    return q_buf[..., :r]


def drift(q_DR: torch.Tensor, exact_DR: torch.Tensor) -> torch.Tensor:
    """1 - ||Q^T Q_exact||_F^2 / r as a 0-dim tensor (no host sync): how far the tracker is from exact."""
    r = q_DR.shape[1]
    return 1.0 - (q_DR.T @ exact_DR.to(q_DR.dtype)).square().sum() / r


# -- the split ------------------------------------------------------------------------------------
@torch.no_grad()
def shared_at_split(w_EFD: torch.Tensor, u_DR: torch.Tensor | None, form: str,
                    reduce: Callable[[torch.Tensor], None] | None = None, num_experts: int = 0) -> torch.Tensor:
    """The shared part from the experts' weights: S = mean_i W_i (full), A = mean_i W_i U (lowrank),
    A_i = W_i U (per_expert, exact). reduce: the sum over the ranks holding the other experts, with
    `num_experts` of them in all (w_EFD is this rank's shard)."""
    if form == "per_expert":
        return w_EFD @ _as(u_DR, w_EFD)
    if reduce is None:
        mean = w_EFD.mean(0)
    else:
        mean = w_EFD.sum(0)
        reduce(mean)
        mean /= num_experts
    return mean if form == "full" else mean @ _as(u_DR, w_EFD)


def shared_contribution(shared: torch.Tensor, u_DR: torch.Tensor, form: str) -> torch.Tensor:
    """C (F x D, or E x F x D per expert): the part of W_i the shared part stands for; T_i = W_i - C_i."""
    return shared if form == "full" else shared @ _as(u_DR, shared).T


@torch.no_grad()
def shared_gradient(g: Grads, form: str, q_PDR: torch.Tensor | None,
                    reduce: Callable[[torch.Tensor], None] | None = None,
                    f_PFR: torch.Tensor | None = None) -> torch.Tensor:
    """The shared part's gradient, from the experts' whole gradients (before their tails are split).

    full: (sum_i G_i) Q Q^T, or the plain sum_i G_i when q is None (the control); two-sided (f
    given): sum_i G_i - (I - P_F)(sum_i G_i)(I - P_D) = P_F G + (I - P_F) G P_D, the paper's common
    update; lowrank: (sum_i G_i) U; per_expert: G_i U (E x P x F x R). `reduce` sums over the
    processes holding the other experts (FSDP2); a per-expert gradient needs none."""
    gs, q = per_projection(g, q_PDR)
    if form == "per_expert":
        q = _as(q, gs[0])
        return torch.stack([_each(g_p, q_p) for g_p, q_p in zip(gs, q.unbind(0))], 1)
    s_PFD = torch.stack([g_p.sum(0) for g_p in gs])
    if reduce is not None:
        reduce(s_PFD)
    if form == "lowrank":
        return torch.bmm(s_PFD, _as(q, s_PFD))
    if f_PFR is not None:
        unique = s_PFD.clone().unsqueeze(0)
        split_tails(unique, q, f_PFR=f_PFR)
        return s_PFD.sub_(unique[0])
    if q_PDR is not None:
        keep_inside(s_PFD, q)
    return s_PFD


@torch.no_grad()
def split_tails(g: Grads, q_PDR: torch.Tensor, f_PFR: torch.Tensor | None = None) -> None:
    """The experts' gradients keep only their tails: G_i <- G_i (I - Q Q^T), or two-sided (f given)
    (I - P_F) G_i (I - Q Q^T), in place."""
    if f_PFR is None:
        project_out(g, q_PDR)
        return
    gs, q = per_projection(g, q_PDR)
    f = per_projection(g, f_PFR)[1]
    for g_p, q_p, f_p in zip(gs, q.unbind(0), f.unbind(0)):
        _project_out_one(g_p, _as(q_p, g_p))
        _project_rows_out_one(g_p, _as(f_p, g_p))


@torch.no_grad()
def split_gradient(g: Grads, q_PDR: torch.Tensor, form: str = "full",
                   reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The one-sided split when the shared part's gradient is kept in the split's own basis Q: the tails
    G_i (I - Q Q^T) in place, and the shared part's gradient from the same products Y_i = G_i Q:
    full (sum_i Y_i) Q^T = (sum_i G_i) Q Q^T, lowrank sum_i Y_i, per_expert Y_i (E x P x F x R).

    The same numbers as `shared_gradient` then `split_tails` up to rounding, from one pass over the
    gradients instead of two (no sum of the E whole gradients, no second product with Q). `reduce` sums
    the (P, F, R) sum over processes (FSDP2): R/D of the full sum."""
    gs, q = per_projection(g, q_PDR)
    q = _as(q, gs[0])
    y_PEFR = [_project_out_one(g_p, q[p]) for p, g_p in enumerate(gs)]
    if form == "per_expert":
        shared = torch.stack(y_PEFR, 1)
    else:
        shared = torch.stack([y.sum(0) for y in y_PEFR])
        if reduce is not None:
            reduce(shared)
        if form == "full":
            shared = torch.bmm(shared, q.transpose(-1, -2))
    return shared


@torch.no_grad()
def fold_shared(w_EFD: torch.Tensor, step: torch.Tensor, u_DR: torch.Tensor, form: str) -> None:
    """The shared part's optimizer step, added to every expert: W_i += dS (full), dA U^T (lowrank),
    dA_i U^T (per_expert). In place."""
    add_to_experts(w_EFD, shared_contribution(_as(step, w_EFD), u_DR, form))


def add_to_experts(w_EFD: torch.Tensor, c: torch.Tensor, alpha: float = 1.0) -> None:
    """w_i += alpha c for every expert i, in place; c (F, D) broadcast over the experts, or (E, F, D).

    A down view is the transpose of its storage: the add runs in the storage's orientation, since a
    broadcast add onto a transposed view walks memory across the rows (lab model: 44 against 15 us)."""
    if not w_EFD.is_contiguous() and w_EFD.transpose(-1, -2).is_contiguous():
        w_EFD.transpose(-1, -2).add_(c.transpose(-1, -2).contiguous(), alpha=alpha)
    else:
        w_EFD.add_(c, alpha=alpha)


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
def project_out(x: Grads, q: torch.Tensor) -> None:
    """x_ip <- x_ip (I - Q_p Q_p^T) in place; x (E, P, F, D), (E, F, D) or P (E, F, D) views, q (P, D, R) or (D, R)."""
    xs, q = per_projection(x, q)
    # One projection at a time: in a training step that measured faster (lab model: 1.5 against 1.8 ms a
    # step) than one (E P)-batched update, which needs Q^T copied per expert.
    for x_p, q_p in zip(xs, q.unbind(0)):
        _project_out_one(x_p, _as(q_p, x_p))


def _project_out_one(x_EFD: torch.Tensor, q_DR: torch.Tensor) -> torch.Tensor:
    """x_i <- x_i (I - Q Q^T) in place; returns y_i = x_i Q (E, F, R), computed before."""
    e = x_EFD.shape[0]
    y_EFR = _each(x_EFD, q_DR)
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
    return y_EFR


@torch.no_grad()
def project_rows_out(x: Grads, f: torch.Tensor) -> None:
    """x_ip <- (I - F_p F_p^T) x_ip in place (the ffn side); x as in `project_out`, f (P, F, R) or (F, R)."""
    xs, f = per_projection(x, f)
    for x_p, f_p in zip(xs, f.unbind(0)):
        _project_rows_out_one(x_p, _as(f_p, x_p))


def _project_rows_out_one(x_EFD: torch.Tensor, f_FR: torch.Tensor) -> None:
    e = x_EFD.shape[0]
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

