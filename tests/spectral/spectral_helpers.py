"""Shared synthetic matrices for the spectral tests (tiny shapes, fixed seeds)."""

import torch


def orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64)).Q.float()


def planted_stack(e: int, f: int, d: int, r: int, noise: float, gen: torch.Generator):
    """Experts W_i = A_i U^T + noise * N_i sharing the r-dim subspace U (D x r)."""
    u = orthonormal(d, r, gen)
    a = torch.randn(e, f, r, generator=gen)
    w = a @ u.T + noise * torch.randn(e, f, d, generator=gen)
    return w, u


def with_spectrum(f: int, d: int, s: torch.Tensor, gen: torch.Generator):
    """An F x D matrix with singular values s (len <= min(F, D)) and its right singular vectors."""
    n = s.numel()
    left = orthonormal(f, n, gen)
    right = orthonormal(d, n, gen)
    return left @ torch.diag(s.float()) @ right.T, right


def make_gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
