"""Expert parallelism for the transformers MoE models: transformers' own EP, with SD-MoE on top.

    from sdmoe.train.expert_parallel import expert_parallel
    model = expert_parallel(model, ep_size=2)          # inside torchrun, every rank built the same model
    optimizer = torch.optim.AdamW(model.parameters())  # build it AFTER distributing
    handle = sdmoe.attach(model, optimizer, sdmoe.SDMoEConfig(split_step=0))

This is transformers' `DistributedConfig(ep_size=..., fsdp_size=...)` path
(`transformers.distributed`), applied to a model that is already built: the experts become
`Shard(0)` DTensors on the expert mesh `(efsdp, ep)` (each EP rank owns E / ep_size whole
experts, FSDP-sharded over `efsdp = world / ep_size` ranks that own the same ones), the routed
tokens travel to their experts' rank and back by two all-to-alls per layer
(`ep_implementation="all_to_all"`; gloo runs them on CPU), and everything else is FSDP2 over
all ranks. SD-MoE's split then builds its state from each rank's whole experts and sums over
experts with one all-reduce per mesh dim (`sdmoe.method.sharding`). Status, tests and the
bytes the split adds: docs/distributed.md.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from sdmoe.errors import UserError

IMPLEMENTATIONS = ("all_to_all", "all_reduce")


def expert_parallel(model: nn.Module, ep_size: int, fsdp_size: int | None = None,
                    implementation: str = "all_to_all") -> nn.Module:
    """Shard `model`'s experts over `ep_size` ranks and FSDP2-shard the rest over `fsdp_size` (default:
    every rank); returns the model (distributed in place). Needs an initialised process group whose size
    is `fsdp_size`; `ep_size` must divide it and the number of experts. "all_reduce" runs every rank's
    experts on one batch the EP group shares (no all-to-all) and needs ep_size == 1 tensor parallel
    group, so it is for inference; "all_to_all" trains."""
    if not dist.is_available() or not dist.is_initialized():
        raise UserError("expert_parallel needs an initialised process group; launch with torchrun "
                        "(or call torch.distributed.init_process_group first)")
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"implementation={implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    world = dist.get_world_size()
    fsdp_size = world if fsdp_size is None else fsdp_size
    if fsdp_size != world or ep_size < 1 or world % ep_size:
        raise UserError(f"expert_parallel on {world} processes needs fsdp_size={world} and an ep_size that divides "
                        f"it (got fsdp_size={fsdp_size}, ep_size={ep_size}); launch as many processes as that")
    plan = getattr(getattr(model, "config", None), "base_model_ep_plan", None)
    if not plan:
        raise UserError(f"{type(model).__name__} has no expert-parallel plan in transformers (base_model_ep_plan); "
                        "use a model class that has one (qwen3_moe, qwen2_moe, olmoe, mixtral, ...) or FSDP2 "
                        "(`sdmoe.train.fsdp.shard_model`)")
    num_experts = _num_experts(model)
    if num_experts % ep_size:
        raise UserError(f"{num_experts} experts do not split evenly over ep_size={ep_size} ranks; choose an "
                        "ep_size that divides the number of experts")
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh

    config = DistributedConfig(ep_size=ep_size, fsdp_size=fsdp_size, ep_implementation=implementation)
    _, meshes = initialize_distributed_mesh(config)
    return type(model).maybe_distribute_model(model, config, meshes)


def _num_experts(model: nn.Module) -> int:
    from sdmoe.moe import find_moe_blocks

    return find_moe_blocks(model)[0].num_experts
