"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the transformers MoE models we build.

    from sdmoe.train.fsdp import shard_model
    model = shard_model(model)             # inside an initialised process group (torchrun)
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)   # build it AFTER sharding

Each decoder layer becomes one FSDP unit (its parameters are all-gathered for its forward
and backward, its gradients reduce-scattered), then the root takes what is left
(embeddings, final norm, LM head). Parameters become DTensors sharded on dim 0 over the
mesh; `model.parameters()` yields the local shards, so the optimizer must be built after
sharding. SD-MoE: split first (`controller.split()`), then shard; the controller's
gradient split then runs on the shards (`sdmoe.method.sharding`). Status: docs/distributed.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sdmoe.errors import UserError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (`model.model.layers` for every transformers causal LM we build)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"{type(model).__name__} has no decoder layers at .model.layers; shard_model supports "
                        "transformers causal LMs")
    return list(layers)


def check_sdmoe(controller) -> None:
    """Refuse SD-MoE settings that cannot run on FSDP2-sharded parameters (docs/distributed.md).

    The gradient split, the tracker, the shared update and the tail re-projection run on the
    sharded experts (`sdmoe.method.sharding`: fused experts on their local shard, the tracker's
    M Q and the shared gradient all-reduced). Not supported, each for a reason: a split after
    sharding (its bases and shared parts read every expert's weights, which `sdmoe train` does
    before sharding), re-estimating U during training (the same), the per-expert form (its
    shared parts A_i would be sharded with the experts, and the shared optimizer is replicated),
    and the split on module-list experts (FSDP2 shards each expert's Linear on its rows, not on
    experts)."""
    if controller is None:
        return
    if not controller.split_done:
        raise UserError("shard the model after the SD-MoE split: call controller.split() (split_step=0) before "
                        "shard_model, or use DDP (torchrun + `sdmoe train`) for a split during training")
    cfg = controller.cfg
    if cfg.reestimate_every:
        raise UserError(f"SD-MoE reestimate_every={cfg.reestimate_every} does not run on FSDP2-sharded parameters; "
                        "set reestimate_every=0 under FSDP2, or use DDP")
    if cfg.refresh_every and cfg.basis_source == "weights":
        raise UserError("SD-MoE refresh_every with basis_source='weights' reads every expert's weights, which "
                        "FSDP2 shards; use basis_source='shared', refresh_every=0, or DDP")
    if controller.form == "per_expert":
        raise UserError("SD-MoE's per-expert form does not run under FSDP2 (its shared parts would shard with the "
                        "experts); use the shared form, or DDP")
    if any(layer.block.layout != "fused" for layer in controller.layers):
        raise UserError("SD-MoE needs fused experts under FSDP2 (this model keeps its experts in a module list); "
                        "use DDP")


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True, controller=None) -> nn.Module:
    """`fully_shard` every decoder layer, then the root module; returns `model` (sharded in place).

    mesh: a 1-D DeviceMesh (default: every rank of the default process group, on the
    parameters' device type). Needs an initialised process group (`torchrun`).
    controller: the model's `SDMoE` controller, if any: checked by `check_sdmoe` first."""
    check_sdmoe(controller)
    if not dist.is_available() or not dist.is_initialized():
        raise UserError("shard_model needs an initialised process group; launch with torchrun "
                        "(or call torch.distributed.init_process_group first)")
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


# -- what `sdmoe train --set loop.parallel=fsdp` needs ------------------------------------


def shard_for_training(model: nn.Module, optimizer: torch.optim.Optimizer, controller=None) -> None:
    """Shard `model` (split first) and point `optimizer`'s groups at the sharded parameters.

    FSDP2 replaces every parameter with a DTensor one, so an optimizer built before
    sharding would hold the wrong tensors; its groups (names, lr multipliers, weight
    decay, order) are kept and re-pointed by parameter name. It must hold no state yet:
    load that after sharding (`load_optimizer_state`)."""
    if any(optimizer.state.values()):
        raise UserError("shard_for_training needs an optimizer without state; load its state after sharding")
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    shard_model(model, controller=controller)
    sharded = dict(model.named_parameters())
    for group, members in zip(optimizer.param_groups, group_names):
        group["params"] = [sharded[n] for n in members]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the whole, unsharded model, keyed by parameter name, on
    rank 0's CPU ({} on other ranks). Collective: every rank calls it. The model's keys are
    those of the plain model, so `model.load_state_dict` of an unsharded copy takes them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else {}
    return model_sd, optim_sd


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_state_dicts` optimizer state (every rank holds it whole) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
