"""SD-MoE on FSDP2-sharded parameters: local shards and one all-reduce.

Under `torch.distributed.fsdp.fully_shard` every parameter is a DTensor sharded on
dim 0 over the mesh, and so is its gradient after backward (already averaged over
ranks by FSDP's reduce-scatter). The bases U and the tracked Q are plain buffers,
identical on every rank. DTensor refuses to mix the two in one op, and it should: the
split's maths does not follow dim-0 sharding everywhere. What each part needs:

- tails (fused experts, E x ... in the host's layout) are sharded on the expert dim:
  each rank holds whole experts, so every per-expert operation (projection of G_i or
  T_i, per-expert normalisation) runs exactly on the local shard (`local`);
- the tracker's M Q = sum_i G_i^T (G_i Q) sums over ALL experts: each rank's partial
  sum is all-reduced (one D x X message per projection group) before the QR, which
  then runs on identical input on every rank, so Q stays identical (`reducer`);
- so does the shared part's gradient: the same all-reduce (of sum_i G_i Q, F x R, in the
  one-pass split; of sum_i G_i for the control and the two-sided split), after which the
  shared deltas (plain tensors outside the model, identical on every rank) take the
  same step everywhere;
- whatever reads the weights outside a forward (the spectral monitor) runs inside
  `sdmoe.moe.sharding.unsharded`, FSDP2's own all-gather of the owning layer.

Nothing here is used (or imported from torch.distributed) for unsharded tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdmoe.moe.sharding import is_sharded, local

__all__ = ["local", "reducer"]


def reducer(x: torch.Tensor) -> Callable[[torch.Tensor], None] | None:
    """An in-place sum over the ranks x is sharded across (None for a plain tensor)."""
    if not is_sharded(x):
        return None
    group = x.device_mesh.get_group()

    def all_reduce_(t: torch.Tensor) -> None:
        torch.distributed.all_reduce(t, group=group)

    return all_reduce_
