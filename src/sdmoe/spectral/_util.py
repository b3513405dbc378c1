"""Shared argument checks and small numerical helpers for `sdmoe.spectral`.

Private: nothing here is part of the API. Every check raises a one-line
`UserError` naming the problem and the fix.
"""

from __future__ import annotations

import torch

from sdmoe.errors import UserError

_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(x, ndim: int, name: str, layout: str) -> torch.Tensor:
    """`x` must be a floating tensor with exactly `ndim` dims (named by `layout`)."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}; "
                        f"convert it with torch.as_tensor")
    if x.ndim != ndim:
        raise UserError(f"{name} must have {ndim} dims ({layout}), got shape {tuple(x.shape)}; "
                        f"reshape it to {layout}")
    if not (x.is_floating_point()):
        raise UserError(f"{name} must be a floating tensor, got {x.dtype}; cast it with .float()")
    if any(s == 0 for s in x.shape):
        raise UserError(f"{name} has an empty dimension, shape {tuple(x.shape)}; pass a non-empty {layout} tensor")
    return x


def check_rank(k, d: int, name: str = "k") -> int:
    """A subspace rank: an int with 1 <= k <= d (d = hidden size)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise UserError(f"{name} must be an int, got {k!r}; pass an integer 1 <= {name} <= {d}")
    if k <= 0 or k > d:
        raise UserError(f"{name}={k} is out of range for hidden size D={d}; pass 1 <= {name} <= {d}")
    return k


def check_nonneg_int(v, name: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise UserError(f"{name} must be an int >= {minimum}, got {v!r}; pass e.g. {name}={max(minimum, 1)}")
    return v


def compute_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """float32 by default (also for bf16/fp16 inputs); float64 when the input is
    float64 or when asked for."""
    if dtype is None:
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    if dtype not in _FLOAT_DTYPES:
        raise UserError(f"dtype={dtype} is not supported for spectral computations; pass torch.float32 or torch.float64")
    return dtype


def top_eigh(m_BDD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of symmetric PSD matrices (batched over leading dims),
    largest first. Eigenvalues are clamped at 0 (round-off can make them
    slightly negative). A zero matrix gives zero eigenvalues and the basis
    eigh returns for it (deterministic; standard basis vectors on CPU)."""
    m_BDD = 0.5 * (m_BDD + m_BDD.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(m_BDD)
    evals = evals[..., -k:].flip(-1).clamp_min(0.0)
    evecs = evecs[..., -k:].flip(-1)
    return evecs, evals


def fix_signs(u_BDK: torch.Tensor) -> torch.Tensor:
    """Deterministic column signs: each column's largest-magnitude entry is
    made positive (no host sync)."""
    idx = u_BDK.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(u_BDK, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u_BDK * sign


def gram_apply(w_EFD: torch.Tensor, q_DQ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M Q, W Q) with M = sum_i W_i^T W_i, never forming the D x D matrix.

    Returns z_DQ = sum_i W_i^T (W_i Q) and y, the stacked W_i Q (E*F x Q when
    the stack is viewable as one matrix, else E x F x Q). Work: 4 E F D Q flops.
    """
    e, f, d = w_EFD.shape
    try:
        w2 = w_EFD.view(e * f, d)
    except RuntimeError:  # e.g. a transposed down projection: batched GEMMs read the strides, no copy of W
        y = torch.bmm(w_EFD, q_DQ.expand(e, d, q_DQ.shape[-1]))  # E x F x Q
        z = torch.bmm(w_EFD.transpose(-1, -2), y).sum(0)  # E x D x Q -> D x Q
        return z, y
    y = w2 @ q_DQ  # EF x Q
    z = w2.T @ y  # D x Q
    return z, y
