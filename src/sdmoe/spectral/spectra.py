"""Spectra, energy shares and the data second moment.

All shares are in [0, 1] and are 0 for an all-zero matrix / row (there is no
energy to share), never NaN. Computation in float32 (float64 for float64
input), also for bf16/fp16 input; the second moment accumulates in float64.
"""

from __future__ import annotations

import torch

from sdmoe.errors import UserError

from ._util import check_rank, check_tensor, compute_dtype, fix_signs, top_eigh

__all__ = [
    "energy_share",
    "singular_values",
    "lowrank_share",
    "second_moment",
    "SecondMoment",
    "data_subspace",
    "projected_share",
]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den clamped to [0, 1], 0 where den == 0."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num)).clamp(0.0, 1.0)


def _check_same_d(a: torch.Tensor, b: torch.Tensor, an: str, bn: str) -> None:
    if a.shape[-1] != b.shape[0]:
        raise UserError(f"{an} has hidden size {a.shape[-1]} but {bn} has D={b.shape[0]}; "
                        f"pass a basis of the same hidden space (transpose down projections to F x D)")


def energy_share(w_EFD: torch.Tensor, u_DR: torch.Tensor) -> torch.Tensor:
    """Per expert ||W_i U||_F^2 / ||W_i||_F^2 -> e_E (0 for an all-zero expert)."""
    w_EFD = check_tensor(w_EFD, 3, "w_EFD", "E x F x D")
    u_DR = check_tensor(u_DR, 2, "u_DR", "D x R")
    _check_same_d(w_EFD, u_DR, "w_EFD", "u_DR")
    cdt = compute_dtype(w_EFD, None if u_DR.dtype != torch.float64 else torch.float64)
    w = w_EFD.to(cdt)
    u = u_DR.to(device=w.device, dtype=cdt)
    num = (w @ u).pow(2).sum(dim=(-2, -1))
    den = w.pow(2).sum(dim=(-2, -1))
    return _safe_ratio(num, den)


def singular_values(w_EFD: torch.Tensor) -> torch.Tensor:
    """All singular values of every expert, descending -> s_EK with K = min(F, D) (batched svdvals)."""
    w_EFD = check_tensor(w_EFD, 3, "w_EFD", "E x F x D")
    return torch.linalg.svdvals(w_EFD.to(compute_dtype(w_EFD, None)))


def lowrank_share(g_EFD: torch.Tensor, r: int) -> torch.Tensor:
    """Share of ||G_i||_F^2 in each matrix's top-r singular values -> e_E.

    1 when r >= rank, 0 for an all-zero matrix.
    """
    g_EFD = check_tensor(g_EFD, 3, "g_EFD", "E x F x D")
    check_rank(r, g_EFD.shape[-1], "r")
    s = singular_values(g_EFD)
    e2 = s.pow(2)
    return _safe_ratio(e2[:, :r].sum(-1), e2.sum(-1))


def _flatten_tokens(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{name} must be a tensor of shape T x D (or B x S x D), got {shape}; "
                        f"add a token dimension with x.unsqueeze(0)")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating tensor, got {x.dtype}; cast it with .float()")
    return x.reshape(-1, x.shape[-1])


def second_moment(x_TD: torch.Tensor) -> torch.Tensor:
    """E[x x^T] over tokens (leading dims flattened) in float64 -> c_DD."""
    x = _flatten_tokens(x_TD, "x_TD").to(torch.float64)
    if x.shape[0] == 0:
        raise UserError("x_TD has no tokens; pass at least one token")
    return x.T @ x / x.shape[0]


class SecondMoment:
    """Streaming E[x x^T] accumulated in float64 over batches.

    >>> acc = SecondMoment()
    >>> for x in batches: acc.update(x)      # x: T x D or B x S x D, any float dtype
    >>> c_DD = acc.matrix                    # sum_t x_t x_t^T / count
    """

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self._sum: torch.Tensor | None = None
        self.count = 0

    def update(self, x_TD: torch.Tensor) -> "SecondMoment":
        x = _flatten_tokens(x_TD, "x_TD").to(self.dtype)
        if self._sum is None:
            self._sum = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        elif self._sum.shape[0] != x.shape[1]:
            raise UserError(f"x_TD has hidden size {x.shape[1]} but earlier batches had {self._sum.shape[0]}; "
                            f"use one SecondMoment per layer")
        self._sum.add_(x.T @ x.to(self._sum.device))
        self.count += x.shape[0]
        return self

    @property
    def matrix(self) -> torch.Tensor:
        if self._sum is None or self.count == 0:
            raise UserError("SecondMoment has seen no tokens; call update(x_TD) before reading .matrix")
        return self._sum / self.count


def data_subspace(c_DD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenvectors of a second-moment matrix -> (u_DK, eigvals_K descending, >= 0).

    Keeps float64 for float64 input (as from `SecondMoment`), else float32.
    """
    c_DD = check_tensor(c_DD, 2, "c_DD", "D x D")
    if c_DD.shape[0] != c_DD.shape[1]:
        raise UserError(f"c_DD must be square, got shape {tuple(c_DD.shape)}; pass second_moment(x_TD)")
    check_rank(k, c_DD.shape[0])
    u, vals = top_eigh(c_DD.to(compute_dtype(c_DD, None)), k)
    return fix_signs(u), vals


def projected_share(w_ND: torch.Tensor, u_DK: torch.Tensor) -> torch.Tensor:
    """Per row ||P w_n||^2 / ||w_n||^2 with P = U U^T -> s_N (0 for a zero row).

    Typical use: router rows against the data or common expert subspace;
    the random baseline is K/D.
    """
    w_ND = check_tensor(w_ND, 2, "w_ND", "N x D")
    u_DK = check_tensor(u_DK, 2, "u_DK", "D x K")
    _check_same_d(w_ND, u_DK, "w_ND", "u_DK")
    return energy_share(w_ND.unsqueeze(1), u_DK)  # each row is a one-row "expert"
