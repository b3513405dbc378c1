"""Data-parallel training on PyTorch's own engine (torchrun + DDP).

`torchrun --nproc-per-node N -m sdmoe train ...` sets RANK / WORLD_SIZE /
LOCAL_RANK; we join the process group (gloo on CPU, nccl on GPU) and every
rank takes its slice of the SAME global batch, so N processes see exactly the
batch one process would: the loss trace matches single-process training up to
float reduction order (and the host models' balance loss, which is computed
per slice). DDP all-reduces gradients during backward, so the SD-MoE gradient
split runs on identical averaged gradients on every rank; the bases are
broadcast from rank 0 after every split all the same, so they are bit-equal.
Only rank 0 writes checkpoints, logs and the final model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sdmoe.device import resolve_device
from sdmoe.errors import UserError
from sdmoe.train.config import launched_world


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes; a plain process gets world size 1.

    `device` is `loop.device`: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N. Under
    torchrun each rank takes the GPU of its local rank (NCCL), or the CPU (gloo) for `cpu`."""
    world = launched_world()  # a partial or inconsistent torchrun environment: one line, not a KeyError
    chosen = resolve_device(device)
    if world <= 1:
        return DistContext(device=chosen)
    cuda = chosen.type == "cuda"
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def shard_batch(input_ids_BS: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows of the global batch (the global batch size must divide evenly)."""
    if not ctx.enabled:
        return input_ids_BS
    rows = input_ids_BS.shape[0]
    if rows % ctx.world_size:
        raise UserError(
            f"data.batch_size={rows} does not split over {ctx.world_size} processes; "
            f"use a multiple of {ctx.world_size}"
        )
    per = rows // ctx.world_size
    return input_ids_BS[ctx.rank * per : (ctx.rank + 1) * per]


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around the model (call again after SD-MoE replaces parameters)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def mean_across(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.world_size


def sum_across_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Make every tensor (SD-MoE's bases and shared parts) rank 0's, in place."""
    if ctx.enabled:
        for t in tensors:
            dist.broadcast(t, src=0)


@torch.no_grad()
def tensors_agree(tensors: list[torch.Tensor], ctx: DistContext) -> bool:
    """Whether every rank holds bit-identical tensors (a checksum compared across ranks)."""
    if not ctx.enabled:
        return True
    local = torch.stack([t.double().sum() for t in tensors] or [torch.zeros((), dtype=torch.float64)])
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local.to(ctx.device))
    return all(torch.equal(g, gathered[0]) for g in gathered)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
