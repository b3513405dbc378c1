"""How a run is spread over processes, behind one interface: the loop never asks which.

    par = choose(cfg)                                   # once, from loop.parallel and the launch
    model = par.load_init(cfg.init) if cfg.init else par.build(cfg, tokenizer)
    engine = par.parallelize(model, optimizer, handle)  # after the SD-MoE split where it must come first
    loss = engine(input_ids=par.batch(input_ids_BS))    # this rank's rows of the global batch

| implementation | chosen for | the model | a checkpoint's state |
|---|---|---|---|
| `Single` | one process | itself | `state_dict()` |
| `DDP` | torchrun, loop.parallel auto or ddp | replicated (`DistributedDataParallel`) | rank 0's `state_dict()` |
| `FSDP2` | torchrun, loop.parallel=fsdp | each decoder layer sharded (`train.fsdp`) | gathered whole on rank 0 |

Under torchrun (`torchrun --nproc-per-node N -m sdmoe train ...` sets RANK / WORLD_SIZE / LOCAL_RANK) a
run joins the process group (gloo on CPU, nccl on GPU) and every rank takes its slice of the SAME global
batch, so N processes see exactly the batch one process would: the loss trace matches one process up to
float reduction order (and the host models' balance loss, computed per slice). The SD-MoE gradient split
runs on gradients already averaged over ranks; the bases are broadcast from rank 0 after every split all
the same, so they are bit-equal. Only rank 0 writes checkpoints, logs and the final model (`is_main`).
Expert parallelism is a library function for one's own loop (`train.expert_parallel`): `sdmoe train` has
no loop.parallel for it. Status and tests: docs/distributed.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from sdmoe.device import resolve_device
from sdmoe.errors import UserError
from sdmoe.models.pretrained import for_training, load_init_model
from sdmoe.train import fsdp
from sdmoe.train.config import RunConfig, launched_world
from sdmoe.train.step import start_model


class Parallelism(Protocol):
    """What a run needs from its parallelism. Collective methods are called by every rank."""

    rank: int
    world_size: int
    device: torch.device
    # state.json's "parallel": the optimizer state by tensor ("ddp": one process and DDP) or by name ("fsdp")
    checkpoint_format: str

    @property
    def is_main(self) -> bool:
        """Whether this rank writes (the run directory, logs, checkpoints, the final model)."""

    def load_init(self, path: str) -> nn.Module:
        """`--init`'s checkpoint set up for training (collective under FSDP2: each rank reads its slices)."""

    def build(self, cfg: RunConfig, tokenizer) -> nn.Module:
        """A new model from `cfg.model`, drawn from `cfg.loop.seed`."""

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer, handle) -> nn.Module:
        """The module the forward runs through (`handle`: `sdmoe.attach`'s, whose split may have to come first)."""

    def batch(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch."""

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (collective)."""

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks, in place (collective): the expert loads every rank's bias update reads."""

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Make every tensor rank 0's, in place (collective): SD-MoE's bases after a split."""

    def agree(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every rank holds the same tensors (a checksum compared across ranks; collective)."""

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        """A checkpoint's whole model state into `model` (before `parallelize`)."""

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """A checkpoint's optimizer state into `optimizer` (after `parallelize`)."""

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The whole (model, optimizer) state on rank 0, ({}, {}) elsewhere (collective under FSDP2)."""

    def final_model(self, model: nn.Module, cfg: RunConfig, tokenizer) -> nn.Module | None:
        """The trained model, whole and plain, on rank 0 for export (None elsewhere; collective under FSDP2)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the process group."""


def choose(cfg: RunConfig) -> Parallelism:
    """The run's parallelism, from `loop.parallel` and the launch; joins torchrun's process group.

    `loop.device` picks the device: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N. Under torchrun
    each rank takes the GPU of its local rank (NCCL), or the CPU (gloo) for `cpu`."""
    world = launched_world()  # a partial or inconsistent torchrun environment: one line, not a KeyError
    device = resolve_device(cfg.loop.device)
    if world <= 1:
        return Single(device)
    _check_rows(cfg.data.batch_size, world)  # before anything is written, not at the first step
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.loop.parallel == "fsdp":
        # from a checkpoint always, from scratch with loop.meta_init: no rank ever holds the whole model
        return FSDP2(device, rank, world, meta=bool(cfg.init) or cfg.loop.meta_init)
    return DDP(device, rank, world)


def _check_rows(rows: int, world: int) -> None:
    if rows % world:
        raise UserError(f"data.batch_size={rows} does not split over {world} processes; use a multiple of {world}")


@dataclass
class Single:
    """One process: the model itself, every collective a no-op."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    checkpoint_format = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def load_init(self, path: str) -> nn.Module:
        return load_init_model(path, self.device)

    def build(self, cfg: RunConfig, tokenizer) -> nn.Module:
        return start_model(cfg, tokenizer, self.device)

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer, handle) -> nn.Module:
        return model  # SD-MoE splits at sdmoe.split_step, in the forward's hook

    def batch(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return input_ids_BS

    def mean(self, value: float) -> float:
        return value

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def agree(self, tensors: list[torch.Tensor]) -> bool:
        return True

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        if not self.is_main:
            return {}, {}
        return model.state_dict(), optimizer.state_dict()

    def final_model(self, model: nn.Module, cfg: RunConfig, tokenizer) -> nn.Module | None:
        return model

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _ProcessGroup(Single):
    """Data parallel over torchrun's process group: the collectives `Single` skips; the model as `Single`'s."""

    def batch(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        rows = input_ids_BS.shape[0]
        _check_rows(rows, self.world_size)
        per = rows // self.world_size
        return input_ids_BS[self.rank * per : (self.rank + 1) * per]

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    @torch.no_grad()
    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            dist.broadcast(t, src=0)

    @torch.no_grad()
    def agree(self, tensors: list[torch.Tensor]) -> bool:
        local = torch.stack([t.double().sum() for t in tensors] or [torch.zeros((), dtype=torch.float64)])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local.to(self.device))
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class DDP(_ProcessGroup):
    """Every rank holds the whole model; `DistributedDataParallel` all-reduces the gradients in backward.

    SD-MoE keeps the model plain (its state lives outside it), so one wrapper serves the whole run,
    a split during training included."""

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer, handle) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


@dataclass
class FSDP2(_ProcessGroup):
    """Every decoder layer sharded over the ranks (`torch.distributed.fsdp.fully_shard`, `train.fsdp`).

    SD-MoE splits at step 0 (`validate` refuses a later split): before sharding a model built whole, or on
    the shards of one built on the meta device (`meta`). Checkpoints hold the whole state, gathered to rank
    0; the optimizer's by parameter name, so they resume under FSDP2 only."""

    meta: bool = False  # built on the meta device, each rank holding only its shards from the start
    checkpoint_format = "fsdp"

    def load_init(self, path: str) -> nn.Module:
        return for_training(fsdp.from_pretrained_sharded(path), self.device)  # each rank reads its slices

    def build(self, cfg: RunConfig, tokenizer) -> nn.Module:
        if not self.meta:  # build_model's draws, the same as DDP's and one process's; sharded after the split
            return super().build(cfg, tokenizer)
        return fsdp.build_sharded(cfg.model, len(tokenizer), seed=cfg.loop.seed, eos_token_id=tokenizer.eos_token_id)

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer, handle) -> nn.Module:
        if self.meta:  # sharded already: the split builds its state from the local shards
            fsdp.check_sdmoe(handle.controller, split_on_shards=True)
            handle.split()
        else:  # the split reads every expert whole: before sharding, which re-points the optimizer's groups
            handle.split()
            fsdp.shard_for_training(model, optimizer, handle.controller)
        return model

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        if self.meta:  # every rank has the whole state; each keeps its slices
            fsdp.load_model_state(model, state)
        else:  # not sharded yet
            model.load_state_dict(state)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        fsdp.load_optimizer_state(model, optimizer, state)

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return fsdp.full_state_dicts(model, optimizer)

    def final_model(self, model: nn.Module, cfg: RunConfig, tokenizer) -> nn.Module | None:
        state, _ = fsdp.full_state_dicts(model)
        if not state:
            return None
        plain = start_model(cfg, tokenizer, "cpu")
        plain.load_state_dict(state)  # the model is plain at every step: same keys, sharded or not
        return plain
