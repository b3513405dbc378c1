"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the transformers MoE models we build.

    from sdmoe.train.fsdp import shard_model
    model = shard_model(model)             # inside an initialised process group (torchrun)
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)   # build it AFTER sharding

Each decoder layer becomes one FSDP unit (its parameters are all-gathered for its forward
and backward, its gradients reduce-scattered), then the root takes what is left
(embeddings, final norm, LM head). Parameters become DTensors sharded on dim 0 over the
mesh; `model.parameters()` yields the local shards, so the optimizer must be built after
sharding. SD-MoE: split first (`controller.split()`), then shard, or, for a model built on the
meta device (`build_sharded`, `from_pretrained_sharded`: no rank ever holds it whole), split on the
shards; the controller's gradient split then runs on the shards (`sdmoe.method.sharding`).
Status: docs/distributed.md.
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


def check_sdmoe(controller, split_on_shards: bool = False) -> None:
    """Refuse SD-MoE settings that cannot run on FSDP2-sharded parameters (docs/distributed.md).

    The gradient split, the tracker, the shared update and the tail re-projection run on the
    sharded experts (`sdmoe.method.sharding`: fused experts on their local shard, the tracker's
    M Q and the shared gradient all-reduced). Not supported, each for a reason: a split during
    training (it would add state to a model FSDP already owns mid-run; a split right after sharding
    is fine: `split_on_shards`), re-estimating U during training (the same), the per-expert form (its
    shared parts A_i would be sharded with the experts, and the shared optimizer is replicated),
    and the split on module-list experts (FSDP2 shards each expert's Linear on its rows, not on
    experts). split_on_shards: the model is sharded already (built on the meta device) and the split,
    due now, builds its state from the local shards (`SDMoE.split` on sharded experts)."""
    if controller is None:
        return
    if split_on_shards and controller.cfg.split_step != 0:
        raise UserError(f"a model sharded from the meta device splits at once: set sdmoe.split_step=0 (got "
                        f"{controller.cfg.split_step})")
    if not controller.split_done and not split_on_shards:
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
    kept = sorted({block.layout for block in controller.blocks} - {"fused"})
    if kept:
        raise UserError(f"SD-MoE needs fused experts under FSDP2 (this model keeps its experts as a "
                        f"{' and a '.join(k.replace('_', ' ') for k in kept)}); use DDP")


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
        if device_type == "meta":  # built on the meta device: the shards go where the process group computes
            device_type = _shard_device().type
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


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a whole model state dict (every rank holds it, as `full_state_dicts` wrote it) into the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_state_dicts` optimizer state (every rank holds it whole) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# -- FSDP2 from the meta device: no rank ever holds the whole model ---------------------------------------


def build_sharded(cfg, vocab_size: int, seed: int = 0, eos_token_id: int = 0, mesh=None) -> nn.Module:
    """`sdmoe.models.build_model(cfg, vocab_size)`'s model, FSDP2-sharded, built without ever holding it
    whole: on the meta device, sharded (`shard_model`), then each rank draws its own shards (`init_shards`).
    The same seed gives the same model on any number of ranks (tested), though not `build_model`'s draws:
    for those, save a `build_model` and load it (`from_pretrained_sharded`). Train mode."""
    from transformers import AutoModelForCausalLM

    from sdmoe.models.build import is_zero_init_router, model_hf_config

    device = _shard_device() if mesh is None else torch.device(mesh.device_type)
    with torch.device("meta"):  # the config names the device's expert kernel, as build_model's does
        model = AutoModelForCausalLM.from_config(model_hf_config(cfg, vocab_size, eos_token_id, device))
    materialize(model, mesh)
    init_shards(model, seed)
    if cfg.style.startswith("deepseek"):  # build_model's second draw, in the same order
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for name, p in model.named_parameters():
                if is_zero_init_router(name):
                    _copy_part(p, torch.nn.init.normal_(torch.empty(p.shape, dtype=p.dtype), std=cfg.init_std))
    return model.train()


def from_pretrained_sharded(path, mesh=None) -> nn.Module:
    """A local transformers checkpoint (`sdmoe train --init` takes the same directory), FSDP2-sharded, its
    weights read shard by shard: each rank reads only its slice of each tensor (`load_shards`)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} holds no config.json; pass a directory written by save_pretrained")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):  # our reader dequantises FP8 / MXFP4: the model is a float one
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    materialize(model, mesh)
    load_shards(model, path)
    return model.train()


def materialize(model: nn.Module, mesh=None) -> nn.Module:
    """Shard a model built on the meta device (`shard_model`), then give each rank storage for its shards
    only (`to_empty`); the values are whatever the memory held: fill them (`init_shards`, `load_shards`)."""
    if any(not p.is_meta for p in model.parameters()):
        raise UserError("materialize takes a model built on the meta device (with torch.device('meta'): ...); "
                        "this one already has weights: shard it with shard_model")
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise UserError("a model with tied embeddings is not built on the meta device here; set "
                        "tie_word_embeddings=False, or build it whole and shard_model it")
    shard_model(model, mesh)
    return model.to_empty(device=_shard_device() if mesh is None else mesh.device_type)


def _shard_device() -> torch.device:
    """This process's accelerator when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def init_shards(model: nn.Module, seed: int) -> None:
    """transformers' own initialisation, drawn shard by shard: the same walk over the modules as
    `PreTrainedModel.initialize_weights` (children first, each sub-model with its own `_init_weights`),
    one module at a time on whole CPU copies of its own tensors, from `seed`; each rank keeps its slices.
    The same on any number of ranks, and on a plain meta-built model (`to_empty`) in one process; the
    peak is the largest module's own tensors (an MoE layer's experts)."""
    from transformers import PreTrainedModel
    from transformers import initialization as init

    _check_transformers_model(model, "init_shards")

    def walk(module: nn.Module, init_fn) -> None:
        for child in module.children():
            walk(child, child._init_weights if isinstance(child, PreTrainedModel) else init_fn)
        _init_whole(module, init_fn)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with init.guard_torch_init_functions():
            walk(model, model._init_weights)


@torch.no_grad()
def load_shards(model: nn.Module, path) -> None:
    """Each parameter's slice for this rank, read from the checkpoint's safetensors alone (the rest of the
    tensor is never read); any module: a transformers model (names as `save_pretrained` writes them), or
    another built on the meta device and sharded on dim 0 (a module-list MoE under FSDP2, a training stack's
    stacked experts under its EP), whose names are its state dict's. Buffers: a transformers model's the
    checkpoint does not hold (rotary frequencies) from its own init; another model's persistent ones from the
    checkpoint, its non-persistent ones (counters, caches) left to its own init (torchtitan's `init_states`).
    Refuses, in one line, a checkpoint whose names or shapes are not this model's."""
    from pathlib import Path

    from transformers import PreTrainedModel

    from sdmoe.moe.checkpoint import ModelTensors, SafetensorsWeights

    weights = SafetensorsWeights(Path(path))
    tensors = ModelTensors(weights, getattr(getattr(model, "config", None), "model_type", None))
    transformers_model = isinstance(model, PreTrainedModel)
    wanted = dict(model.named_parameters())
    if not transformers_model:  # its persistent buffers too; the non-persistent ones are the stack's own init's
        persistent = set(model.state_dict(keep_vars=True))
        wanted |= {n: b for n, b in model.named_buffers() if n in persistent}
    missing = sorted(set(wanted) - tensors.names())
    if missing:
        raise UserError(f"{path} has no tensor {missing[0]} (and {len(missing) - 1} more) of this model; load a "
                        "checkpoint written by save_pretrained (or safetensors of this model's state dict), or "
                        "load it whole (--init without FSDP2)")
    for name, p in wanted.items():
        if tuple(tensors.shape(name)) != tuple(p.shape):
            raise UserError(f"{path}: {name} is {tuple(tensors.shape(name))}, the model's is {tuple(p.shape)}; "
                            "the checkpoint is another size of model")
    for name, p in wanted.items():
        shape, start = _part(p)
        part = tensors.get_part(name, start, shape)
        if part.dtype.is_floating_point and not torch.isfinite(part).all():
            raise UserError(f"tensor {name} in {path} holds NaN or infinite values; load an earlier checkpoint")
        _local(p).copy_(part)
        # A memory map keeps every page read from it resident while it is open: closed after each
        # tensor, a rank's peak is its own shards plus one tensor's pages, not every page it ever read.
        weights.close()
    if transformers_model:
        for module in model.modules():  # non-persistent buffers: the model's own init of their module
            if any(b is not None for b in module._buffers.values()):
                _init_whole(module, model._init_weights, keep="buffers")


def _check_transformers_model(model: nn.Module, what: str) -> None:
    """init_shards draws with transformers' own init walk (`_init_weights`), which only their models have."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UserError(f"{what} takes a transformers model (PreTrainedModel); {type(model).__name__} is not one: "
                        "load its weights with load_shards, or build it whole and shard it with shard_model")


def _init_whole(module: nn.Module, init_fn, keep: str = "all") -> None:
    """init_fn(module) on whole CPU copies of its own parameters and buffers, then this rank's slices of
    them copied into the module's (sharded) ones; keep="buffers" or "none" throws the others' draws away."""
    own_p = {n: p for n, p in module._parameters.items() if p is not None}
    own_b = {n: b for n, b in module._buffers.items() if b is not None}
    if not own_p and not own_b:
        init_fn(module)  # nothing of its own: the call may still draw (keep the walk's random stream)
        return
    twin_p = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
              for n, p in own_p.items()}
    twin_b = {n: torch.empty(b.shape, dtype=b.dtype) for n, b in own_b.items()}
    module._parameters.update(twin_p)
    module._buffers.update(twin_b)
    try:
        init_fn(module)
    finally:
        module._parameters.update(own_p)
        module._buffers.update(own_b)
    if keep == "none":
        return
    for n, t in twin_b.items():
        own_b[n].copy_(t)
    if keep == "all":
        for n, t in twin_p.items():
            _copy_part(own_p[n], t)


def _part(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this rank's shard of p in the whole tensor (the whole of a plain tensor)."""
    from sdmoe.moe.sharding import is_sharded

    if not is_sharded(p):
        return tuple(p.shape), (0,) * p.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(pl.is_shard() and type(pl).__name__ != "Shard" for pl in p.placements):
        raise UserError(f"a parameter sharded as {p.placements} is not filled shard by shard here; shard with "
                        "FSDP2's plain Shard(0) (shard_model)")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(shape), tuple(offset)


def _local(p: torch.Tensor) -> torch.Tensor:
    from sdmoe.moe.sharding import local

    return local(p.data)


def _copy_part(p: torch.Tensor, whole_t: torch.Tensor) -> None:
    """Copy this rank's slice of `whole_t` into p's shard."""
    shape, start = _part(p)
    _local(p).copy_(whole_t[tuple(slice(o, o + n) for o, n in zip(start, shape))])
