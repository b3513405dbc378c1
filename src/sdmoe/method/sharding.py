"""SD-MoE on sharded experts: local shards and one all-reduce per sum over experts.

Experts arrive sharded three ways, all as DTensors whose expert dim (dim 0) is split over
one or more mesh dims:
- FSDP2 (`fully_shard`): `Shard(0)` over the data-parallel mesh;
- expert parallelism (transformers' `DistributedConfig(ep_size=...)`, torchtitan's and
  OLMo-core's EP): `Shard(0)` over the EP mesh dim;
- both (EP x FSDP of the experts): a 2-D mesh, e.g. transformers' `(efsdp, ep)` with
  `(_StridedShard(0), Shard(0))`.
In each case a rank holds whole experts (checked: `check_whole_experts`), so every
per-expert operation (the projection of G_i or T_i, the per-expert normalisation) runs
exactly on the local shard (`local`). What sums over ALL experts needs one all-reduce over
the mesh dims that shard the experts (`reducer`; a dim that replicates them already holds
the same sum):
- the tracker's M Q = sum_i G_i^T (G_i Q) (one D x X message per projection), before the
  QR, which then runs on identical input everywhere, so Q stays identical on every rank;
- the shared part's gradient (sum_i G_i Q, F x R, in the one-pass split; sum_i G_i for the
  control and the two-sided split), so the shared deltas, plain tensors outside the model,
  take the same step everywhere;
- at the split, from the weights: the shared part mean_i W_i and the Gram sum_i W_i^T W_i
  the basis comes from (`SDMoE.split` on an already-sharded model: its state is built from
  local shards only).
Whatever reads the weights outside a forward (the spectral monitor) runs inside
`sdmoe.moe.sharding.unsharded`. Nothing here touches torch.distributed for plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdmoe.errors import UserError
from sdmoe.moe.sharding import is_sharded, local

__all__ = ["check_split", "check_whole_experts", "expert_mesh_dims", "is_sharded", "local", "reducer"]

Reduce = Callable[[torch.Tensor], None]


def expert_mesh_dims(x: torch.Tensor, what: str = "the experts") -> list[int]:
    """The mesh dims over which DTensor x's dim 0 (the experts) is split; refuses any other placement."""
    dims = []
    for i, placement in enumerate(x.placements):
        if placement.is_replicate():
            continue
        if getattr(placement, "dim", None) == 0:  # Shard(0), or _StridedShard(0): FSDP2 of an EP shard
            dims.append(i)
            continue
        name = x.device_mesh.mesh_dim_names[i] if x.device_mesh.mesh_dim_names else i
        if placement.is_partial():
            raise UserError(f"{what} have a Partial placement on mesh dim {name!r} (gradients not yet reduced); "
                            "run SD-MoE's split after the data-parallel reduction (optimizer.step(), not backward)")
        raise UserError(f"{what} are sharded as {placement} on mesh dim {name!r}, which cuts inside experts; "
                        "SD-MoE needs whole experts per rank: shard the experts on dim 0 (Shard(0)), as expert "
                        "parallelism and FSDP2 of fused experts do")
    return dims


def reducer(x: torch.Tensor) -> Reduce | None:
    """An in-place sum over the ranks that hold x's other experts (None for a plain tensor, or experts
    replicated everywhere). Over several mesh dims (EP x FSDP) one all-reduce per dim: the sum over a
    dim's group, then over the next of those partial sums, is the sum over the whole submesh."""
    if not is_sharded(x):
        return None
    mesh = x.device_mesh
    groups = [mesh.get_group(i) for i in expert_mesh_dims(x)]
    if not groups:
        return None

    def all_reduce_(t: torch.Tensor) -> None:
        for group in groups:
            torch.distributed.all_reduce(t, group=group)

    return all_reduce_


def check_whole_experts(block, what: str | None = None) -> None:
    """Refuse, in one line, a sharded block whose local shards do not hold whole experts.

    Fused and torchtitan experts keep the experts on dim 0, so any split of dim 0 holds whole
    ones; OLMo-core's flattened (E*F, D) weights hold whole experts only when each shard's rows
    start and end on an expert's boundary; module-list experts under FSDP2 are split row by row
    inside every expert."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    what = what or f"the experts of {block.name}"
    for p in block.host_parameters():
        if not is_sharded(p):
            continue
        if block.layout == "module_list":
            raise UserError(f"{what} are a module list of per-expert Linears that are sharded row by row; SD-MoE "
                            "needs whole experts per rank: use fused experts (transformers 5's default "
                            "experts implementation), or DDP")
        expert_mesh_dims(p, what)
        rows = p.shape[0] // block.num_experts  # 1 for (E, ...) storage, F or D for OLMo-core's flat (E*F, D)
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if rows > 1 and (offset[0] % rows or shape[0] % rows):
            raise UserError(f"{what} are stored flat ({tuple(p.shape)}) and this rank's shard holds rows "
                            f"{offset[0]}..{offset[0] + shape[0]}, which cut an expert of {rows} rows; SD-MoE needs "
                            f"whole experts per rank: use a number of ranks that divides the {block.num_experts} "
                            "experts")


def check_split(block, form: str, data_basis: str | None) -> None:
    """A split on sharded experts (FSDP2, expert parallelism) builds its state from this rank's whole experts
    and all-reduced sums; what needs more than that is refused in one line (`data_basis`: the basis source
    when it is collected from the data, which is not built from shards)."""
    if not any(is_sharded(p) for p in block.host_parameters()):
        return
    check_whole_experts(block)
    if form == "per_expert":
        raise UserError("SD-MoE's per-expert form does not run on sharded experts (its shared parts would shard "
                        "with them); use form='full', or DDP")
    if data_basis is not None:
        raise UserError(f"SD-MoE's split from basis_source={data_basis!r} is not built from sharded experts; use "
                        "basis_source='weights' or 'shared', or split before sharding")
