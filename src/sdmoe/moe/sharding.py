"""Reading a model whose parameters FSDP2 shards (`torch.distributed.fsdp.fully_shard`).

Under FSDP2 every parameter is a DTensor sharded on dim 0, and so is its gradient
after backward. Code that reads experts outside a forward (analysis, monitors) needs
the whole tensors: `unsharded` all-gathers one FSDP unit with FSDP's own machinery,
`whole` gathers one tensor. Both do nothing to a model or tensor that is not sharded,
and neither imports torch.distributed unless it is available.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def is_sharded(x: torch.Tensor | None) -> bool:
    """Whether x is a DTensor (FSDP2's sharded parameters and gradients)."""
    if x is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place edits land in the DTensor); x itself otherwise."""
    return x.to_local() if is_sharded(x) else x


def whole(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather for a DTensor (collective: every rank calls it), x itself otherwise."""
    return x.full_tensor() if is_sharded(x) else x


@contextmanager
def unsharded(model: nn.Module, name: str) -> Iterator[None]:
    """`model.<name>` with whole, plain parameters inside the block (collective: every rank enters).

    Unshards the FSDP2 unit that owns the module (its nearest `fully_shard`-ed ancestor,
    e.g. the decoder layer) and reshards it after; a model without FSDP2 is left alone.
    Gradients stay sharded: read them with `whole`."""
    unit = None
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        parts = name.split(".") if name else []
        for depth in range(len(parts), -1, -1):
            m = model.get_submodule(".".join(parts[:depth]))
            if isinstance(m, FSDPModule):
                unit = m
                break
    if unit is None:
        yield
        return
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of `tensors` together: plain tensors, and DTensors on any meshes (FSDP2's dense mesh and
    the experts' EP mesh at once), which one `get_total_norm` cannot stack. A 0-dim plain tensor, the same
    on every rank (collective for DTensors: every rank calls it with its parameters in the same order)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if is_sharded(t) else None, []).append(t)
    norms = [whole(torch.nn.utils.get_total_norm(ts)) for ts in groups.values()]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def clip_(tensors: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale `tensors` (gradients, plain or DTensors) by min(1, max_norm / norm), torch's clip rule, on the
    local shards: DTensor refuses a plain coefficient, and the shards are views of the DTensors' storage."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([local(t) for t in tensors], coef)
