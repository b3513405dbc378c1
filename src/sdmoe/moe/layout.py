"""Where a transformers model keeps its experts and its router: the MoE blocks of a model.

This is the one module the rest of sdmoe asks for expert weights, in one canonical shape:

    gate_EFD, up_EFD : E x F x D   (rows = ffn units, columns = hidden space)
    down_EDF         : E x D x F   (rows = hidden space)
    router_ED        : E x D

`find_moe_blocks(model)` finds the blocks by structure, not by class name: a module whose experts a
layout adapter reads (`sdmoe.moe.adapters`: fused, stacked, module list) with a router beside them
(`sdmoe.moe.routers`). A `MoEBlock` is that module, its layout adapter (`adapter`) and its router; its
canonical views, gradients and write-back are the adapter's, read through the live model's parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sdmoe.errors import UserError

from .adapters import MLP_NAMES, READ, LayoutAdapter, Place, find_layout, split_gate_up  # noqa: F401 (re-exported)
from .projections import PROJECTIONS
from .routers import RouterAdapter, router_of
from .sharding import local

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
WHICH = ("data", "grad")


def _live(place: Place) -> torch.Tensor:
    """A live model's host tensor, looked up each time: FSDP2 replaces the parameters it shards."""
    module, attr = place
    return getattr(module, attr)


@dataclass
class MoEBlock:
    """One sparse MoE block of a model, with canonical access to its experts (through `adapter`, its layout
    adapter) and its router."""

    name: str  # module path, e.g. "model.layers.3.mlp"
    layer: int  # decoder layer index
    module: nn.Module  # the sparse block (router + experts [+ shared experts])
    router: nn.Module | RouterAdapter  # a module whose `weight` is E x D (or E*D flat): its input is the layer's input
    adapter: LayoutAdapter  # how the experts are kept: `sdmoe.moe.adapters`

    @property
    def layout(self) -> str:
        """"fused" | "stacked" | "module_list"."""
        return self.adapter.kind

    @property
    def experts(self) -> nn.Module:
        return self.adapter.experts

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size

    @property
    def expert_ffn(self) -> int:
        return self.adapter.expert_ffn

    # The fused layout's flags were fields of the block before the adapters; kept readable until callers
    # move to `block.adapter` (False for the other layouts, as the fields were).
    @property
    def transposed(self) -> bool:
        return getattr(self.adapter, "transposed", False)

    @property
    def interleaved(self) -> bool:
        return getattr(self.adapter, "interleaved", False)

    # -- reading -----------------------------------------------------------
    def _weight(self, p: str) -> torch.Tensor:
        """Projection p of the weights themselves (E x F x D; autograd sees through the views)."""
        return self.adapter.views(_live, (p,))[0][p]

    def gate_EFD(self) -> torch.Tensor:
        """Gate weights (a view for fused and stacked layouts, a stacked copy for module lists)."""
        return self._weight("gate")

    def up_EFD(self) -> torch.Tensor:
        return self._weight("up")

    def down_EDF(self) -> torch.Tensor:
        return self._weight("down").transpose(1, 2)

    def router_ED(self) -> torch.Tensor:
        return self.router.weight.view(self.num_experts, self.hidden_size)  # OLMo-core keeps it flat

    def projections(self) -> dict[str, torch.Tensor]:
        """All three projections with the hidden space LAST (down transposed): name -> E x F x D."""
        return {"gate": self.gate_EFD(), "up": self.up_EFD(), "down": self.down_EDF().transpose(1, 2)}

    # -- canonical views for the method (weights or gradients, aliasing storage where possible) --
    def host_parameters(self, projs=PROJECTIONS) -> list[nn.Parameter]:
        """The host Parameters that hold projections `projs`, each once (fused: gate_up_proj holds gate and up)."""
        return [_live(place) for place in self.adapter.host(projs)]

    def views(self, which: str = "data", projs=PROJECTIONS,
              local_shards: bool = True) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """({p: E x F x D} of the weights (which="data") or their gradients ("grad"), commit()).

        Fused and stacked experts: views that alias the storage (a gate or up half, a transposed down), so
        in-place edits land in it and commit() does nothing; under FSDP2 the local shard, which holds whole
        experts (local_shards=False: views of the DTensors themselves). Module lists: stacked copies, and
        commit() writes them back. For "grad", a projection whose gradient is missing is left out."""
        if which not in WHICH:
            raise ValueError(f"which={which!r}: one of {WHICH}")

        def fetch(place: Place) -> torch.Tensor | None:
            t = _live(place)
            t = t.detach() if which == "data" else t.grad
            return t if t is None or not local_shards else local(t)

        return self.adapter.views(fetch, projs)

    def canonical(self, which: str = "data", local_shards: bool = True) -> dict[str, torch.Tensor]:
        """All three projections of the weights (which="data") or their gradients ("grad") as
        {p: E x F x D}, hidden space last, detached: `views` read-only (its commit is not needed).
        {} when any gradient is missing (before the first backward)."""
        views, _ = self.views(which, local_shards=local_shards)
        return {p: v.detach() for p, v in views.items()} if len(views) == len(PROJECTIONS) else {}

    # -- writing -----------------------------------------------------------
    @torch.no_grad()
    def write(
        self,
        gate_EFD: torch.Tensor | None = None,
        up_EFD: torch.Tensor | None = None,
        down_EDF: torch.Tensor | None = None,
    ) -> None:
        """Copy canonical-shape weights into the host's own storage (the projections given)."""
        new = {p: w for p, w in zip(PROJECTIONS, (gate_EFD, up_EFD, None if down_EDF is None else down_EDF.mT))
               if w is not None}
        views, commit = self.views("data", tuple(new), local_shards=False)
        for p, w in new.items():
            views[p].copy_(w)
        commit()


def _as_block(name: str, block: nn.Module) -> MoEBlock | None:
    adapter = find_layout(block)
    if adapter is None:
        return None
    router = router_of(block, adapter.num_experts, adapter.hidden_size, adapter.router_paths)
    if router is None:
        return None
    match = _LAYER_INDEX.search(f".{name}.")
    return MoEBlock(name=name, layer=int(match.group(1)) if match else 0, module=block, router=router,
                    adapter=adapter)


def _experts_of(block: nn.Module) -> nn.Module | None:
    """`experts`, or torchtitan 0.3's `routed_experts.inner_experts`."""
    inner = getattr(getattr(block, "routed_experts", None), "inner_experts", None)
    return inner if isinstance(inner, nn.Module) else getattr(block, "experts", None)


def _why_not(model: nn.Module) -> str | None:
    """Why a model whose modules look like experts yields no MoE block: its experts are not gated, its
    router scores more than its experts, ... (None where nothing looks like experts)."""
    for name, module in model.named_modules():
        found = find_layout(module)
        if found is not None:  # experts we read, but no router we know beside them
            e, d = found.num_experts, found.hidden_size
            held = {id(p) for p in found.experts.parameters()}
            beside = [f"{n} {tuple(p.shape)}" for n, p in module.named_parameters()
                      if id(p) not in held and p.dim() == 2 and p.shape[-1] == d][:3]
            return (f"the experts of {name} ({e} x hidden {d}) have no router whose weight is {e} x {d} (beside "
                    f"them: {', '.join(beside) or 'no hidden x something weight'}): a router that also scores "
                    "something else (zero or shared experts) or is not one linear map")
        experts = _experts_of(module)
        params = {n: tuple(p.shape) for n, p in experts.named_parameters(recurse=False)} if isinstance(
            experts, nn.Module) else {}
        if any(len(s) == 3 for s in params.values()):
            return (f"the experts of {name} ({type(experts).__name__}: {params}) are not a gated MLP with "
                    "gate, up and down projections (SD-MoE splits all three)")
        if "expert" in type(module).__name__.lower() or "moe" in type(module).__name__.lower():
            params = {n: tuple(p.shape) for n, p in module.named_parameters() if p.dim() >= 2}
            if params and not any(len(s) == 3 for s in params.values()) and len(params) <= 8:
                return (f"{name} ({type(module).__name__}: {params}) holds its experts in no form sdmoe "
                        "reads (not E x F x D matrices)")
    return None


def describe_layout(model: nn.Module) -> str:
    """What a model holds, for the error a model without MoE layers gets."""
    kinds = sorted({type(m).__name__ for m in model.modules() if m is not model})[:8]
    return ", ".join(kinds) if kinds else "no submodules"


def find_moe_blocks(model: nn.Module, layers: list[int] | None = None) -> list[MoEBlock]:
    """Every sparse MoE block of `model`, in layer order.

    Raises UserError if there is none (naming what was found instead) or if a
    requested layer holds no MoE block.
    """
    blocks = []
    for name, module in model.named_modules():
        block = _as_block(name, module)
        if block is not None:
            blocks.append(block)
    if not blocks:
        why = _why_not(model) or f"it holds {describe_layout(model)}"
        raise UserError(f"no MoE layers found in {type(model).__name__} ({why}); sdmoe needs routed experts "
                        f"stored as {READ}")
    if layers is not None:
        have = {b.layer for b in blocks}
        missing = sorted(set(layers) - have)
        if missing:
            raise UserError(f"layers {missing} hold no MoE block; MoE layers are {sorted(have)}")
        blocks = [b for b in blocks if b.layer in set(layers)]
    return blocks
