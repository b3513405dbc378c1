"""Where a transformers model keeps its experts and its router.

This is the one module that knows the storage layouts; everything else asks
it for expert weights in one canonical shape:

    gate_EFD, up_EFD : E x F x D   (rows = ffn units, columns = hidden space)
    down_EDF         : E x D x F   (rows = hidden space)
    router_ED        : E x D

Layouts found by structure, not by class name:
- `fused`: transformers 5 experts modules with 3-D parameters `gate_up_proj`
  (E, 2F, D) and `down_proj` (E, D, F); transposed (E, D, 2F) / (E, F, D) and
  interleaved [g0, u0, g1, u1, ...] storage are read through the flags the
  `use_experts_implementation` decorator leaves on the module.
- `module_list`: an `nn.ModuleList` of per-expert MLPs with `gate_proj /
  up_proj / down_proj` (transformers 4, Qwen/DeepSeek remote code) or
  `w1 / w3 / w2` (Mixtral of transformers 4) `nn.Linear`s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sdmoe.errors import UserError

from .sharding import local

PROJECTIONS = ("gate", "up", "down")
# (gate, up, down) attribute names of a per-expert MLP, in order of preference.
MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def split_gate_up(gate_up: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves (views) of a fused (..., 2F, D) tensor: [gate; up] or interleaved [g0, u0, g1, ...]."""
    if interleaved:
        return gate_up[..., 0::2, :], gate_up[..., 1::2, :]
    f = gate_up.shape[-2] // 2
    return gate_up[..., :f, :], gate_up[..., f:, :]
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _mlp_names(mlp: nn.Module) -> tuple[str, str, str] | None:
    for names in MLP_NAMES:
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            return names
    return None


@dataclass
class MoEBlock:
    """One sparse MoE block of a model, with canonical access to its experts."""

    name: str  # module path, e.g. "model.layers.3.mlp"
    layer: int  # decoder layer index
    module: nn.Module  # the sparse block (router + experts [+ shared experts])
    experts: nn.Module
    router: nn.Module  # a module whose `weight` is E x D
    layout: str  # "fused" | "module_list"
    num_experts: int
    hidden_size: int
    expert_ffn: int

    # -- reading -----------------------------------------------------------
    @property
    def _transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def _interleaved(self) -> bool:
        return not getattr(self.experts, "is_concatenated", True)

    def _fused_gate_up(self, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.experts.gate_up_proj if w is None else w
        if self._transposed:
            w = w.transpose(-1, -2)  # (E, 2F, D) view
        return split_gate_up(w, self._interleaved)

    def gate_EFD(self) -> torch.Tensor:
        """Gate weights (a view for fused layouts, a stacked copy for module lists)."""
        if self.layout == "fused":
            return self._fused_gate_up()[0]
        return self._stack(0)

    def up_EFD(self) -> torch.Tensor:
        if self.layout == "fused":
            return self._fused_gate_up()[1]
        return self._stack(1)

    def down_EDF(self) -> torch.Tensor:
        if self.layout == "fused":
            w = self.experts.down_proj
            return w.transpose(1, 2) if getattr(self.experts, "is_transposed", False) else w
        return self._stack(2)

    def router_ED(self) -> torch.Tensor:
        return self.router.weight

    def projections(self) -> dict[str, torch.Tensor]:
        """All three projections with the hidden space LAST (down transposed): name -> E x F x D."""
        return {
            "gate": self.gate_EFD(),
            "up": self.up_EFD(),
            "down": self.down_EDF().transpose(1, 2),
        }

    def _stack(self, which: int) -> torch.Tensor:
        mats = []
        for mlp in self.experts:
            names = _mlp_names(mlp)
            mats.append(getattr(mlp, names[which]).weight)
        return torch.stack(mats)

    # -- canonical views for the method (weights or gradients, aliasing storage where possible) --
    def host_parameters(self, projs=PROJECTIONS) -> list[nn.Parameter]:
        """The host Parameters that hold projections `projs` (fused: gate_up_proj holds gate and up)."""
        if self.layout == "fused":
            names = (["gate_up_proj"] if {"gate", "up"} & set(projs) else []) + (["down_proj"] if "down" in projs else [])
            return [getattr(self.experts, n) for n in names]
        return [getattr(mlp, _mlp_names(mlp)[PROJECTIONS.index(p)]).weight
                for p in PROJECTIONS if p in projs for mlp in self.experts]

    def views(self, which: str = "data", projs=PROJECTIONS,
              local_shards: bool = True) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """({p: E x F x D} of the weights (which="data") or their gradients ("grad"), commit()).

        Fused experts: views that alias the storage (a gate or up half, a transposed down), so in-place
        edits land in it and commit() does nothing; under FSDP2 the local shard, which holds whole
        experts (local_shards=False: views of the DTensors themselves). Module lists: stacked copies, and commit() writes them back. For "grad", a projection
        whose gradient is missing is left out."""
        def get(t: torch.Tensor) -> torch.Tensor | None:
            t = t.detach() if which == "data" else t.grad
            return t if t is None or not local_shards else local(t)

        out: dict[str, torch.Tensor] = {}
        if self.layout == "fused":
            if {"gate", "up"} & set(projs) and (gu := get(self.experts.gate_up_proj)) is not None:
                gate, up = self._fused_gate_up(gu)
                out.update({p: v for p, v in (("gate", gate), ("up", up)) if p in projs})
            if "down" in projs and (dn := get(self.experts.down_proj)) is not None:
                out["down"] = dn if self._transposed else dn.transpose(-1, -2)
            return out, lambda: None
        targets = []
        for p in PROJECTIONS:
            if p not in projs:
                continue
            ts = [get(getattr(mlp, _mlp_names(mlp)[PROJECTIONS.index(p)]).weight) for mlp in self.experts]
            if any(t is None for t in ts):
                continue
            stacked = torch.stack(ts)
            out[p] = stacked.transpose(1, 2) if p == "down" else stacked
            targets.append((ts, stacked))

        def commit() -> None:
            for ts, stacked in targets:
                torch._foreach_copy_(ts, list(stacked.unbind(0)))

        return out, commit

    def gate_up_pair(self, which: str = "grad") -> torch.Tensor | None:
        """Gate and up as one (E, 2, F, D) view of fused [gate; up] storage (one batched pass over both),
        or None where the storage does not allow it (transposed, interleaved, module lists)."""
        if self.layout != "fused" or self._transposed or self._interleaved:
            return None
        t = self.experts.gate_up_proj
        t = t.detach() if which == "data" else t.grad
        if t is None:
            return None
        t = local(t)
        return t.view(t.shape[0], 2, self.expert_ffn, self.hidden_size)

    # -- writing -----------------------------------------------------------
    @torch.no_grad()
    def write(
        self,
        gate_EFD: torch.Tensor | None = None,
        up_EFD: torch.Tensor | None = None,
        down_EDF: torch.Tensor | None = None,
    ) -> None:
        """Copy canonical-shape weights into the host's own storage."""
        if self.layout == "fused":
            gate, up = self._fused_gate_up()
            if gate_EFD is not None:
                gate.copy_(gate_EFD)
            if up_EFD is not None:
                up.copy_(up_EFD)
            if down_EDF is not None:
                self.down_EDF().copy_(down_EDF)
            return
        for i, mlp in enumerate(self.experts):
            g, u, dn = (getattr(mlp, n).weight for n in _mlp_names(mlp))
            if gate_EFD is not None:
                g.copy_(gate_EFD[i])
            if up_EFD is not None:
                u.copy_(up_EFD[i])
            if down_EDF is not None:
                dn.copy_(down_EDF[i])


def _router_of(block: nn.Module, num_experts: int, hidden: int) -> nn.Module | None:
    for attr in ("gate", "router"):
        r = getattr(block, attr, None)
        w = getattr(r, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden):
            return r
    return None


def _shape(module: nn.Module, attr: str) -> torch.Size | None:
    t = getattr(module, attr, None)
    return t.shape if isinstance(t, torch.Tensor) else None


def _as_block(name: str, block: nn.Module) -> MoEBlock | None:
    experts = getattr(block, "experts", None)
    if experts is None:
        return None
    if (shape := _shape(experts, "gate_up_proj")) is not None and len(shape) == 3:
        transposed = getattr(experts, "is_transposed", False)
        e, two_f, d = (shape[0], shape[2], shape[1]) if transposed else tuple(shape)
        layout, num_experts, hidden, ffn = "fused", e, d, two_f // 2
    elif isinstance(experts, nn.ModuleList) and len(experts) and all(_mlp_names(m) for m in experts):
        first = _mlp_names(experts[0])
        ffn, hidden = _shape(getattr(experts[0], first[0]), "weight")
        layout, num_experts = "module_list", len(experts)
    else:
        return None
    router = _router_of(block, num_experts, hidden)
    if router is None:
        return None
    match = _LAYER_INDEX.search(f".{name}.")
    layer = int(match.group(1)) if match else 0
    return MoEBlock(name, layer, block, experts, router, layout, num_experts, hidden, ffn)


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
        raise UserError(
            f"no MoE layers found in {type(model).__name__} (it holds {describe_layout(model)}); "
            "sdmoe needs routed experts stored as fused 3-D `gate_up_proj/down_proj` or a "
            "ModuleList of `gate_proj/up_proj/down_proj` (or `w1/w3/w2`) MLPs with a router `gate`"
        )
    if layers is not None:
        have = {b.layer for b in blocks}
        missing = sorted(set(layers) - have)
        if missing:
            raise UserError(f"layers {missing} hold no MoE block; MoE layers are {sorted(have)}")
        blocks = [b for b in blocks if b.layer in set(layers)]
    return blocks
