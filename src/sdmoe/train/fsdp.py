"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the transformers MoE models we build.

    from sdmoe.train.fsdp import shard_model
    model = shard_model(model)             # inside an initialised process group (torchrun)
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)   # build it AFTER sharding

Each decoder layer becomes one FSDP unit (its parameters are all-gathered for its forward
and backward, its gradients reduce-scattered), then the root takes what is left
(embeddings, final norm, LM head). Parameters become DTensors sharded on dim 0 over the
mesh; `model.parameters()` yields the local shards, so the optimizer must be built after
sharding. Status on CPU/gloo and with SD-MoE: docs/distributed.md.
"""

from __future__ import annotations

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

    Under FSDP2 the parametrized experts work (forward and backward through W_i = S + T_i
    are ordinary autograd on the layer's unsharded parameters), so gradient_split="none"
    trains. The gradient split and the tail re-projection do not: they combine the
    parameters' sharded DTensor gradients/values with the bases, which are plain
    (replicated, unsharded) buffers, and DTensor refuses mixed operands ("aten.bmm.default
    got mixed torch.Tensor and DTensor"); and a split after sharding would replace
    sharded parameters. Split before sharding (split_step=0)."""
    if controller is None:
        return
    if not controller.split_done:
        raise UserError("shard the model after the SD-MoE split: call controller.split() (split_step=0) before "
                        "shard_model, or use DDP (torchrun + `sdmoe train`) for a split during training")
    if controller.cfg.gradient_split != "none":
        raise UserError(f"SD-MoE gradient_split={controller.cfg.gradient_split!r} (mode {controller.cfg.mode!r}) "
                        "does not run on FSDP2-sharded parameters yet (the split mixes DTensor gradients with "
                        "plain basis buffers); use DDP, or gradient_split='none' in shared mode under FSDP2")


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
