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
- `stacked`: one parameter per projection, experts stacked on dim 0, in the
  training stacks' own MoE modules (`sdmoe.integrations.{torchtitan,olmo_core}`):
  torchtitan's `GroupedExperts` (`<moe>.routed_experts.inner_experts`: `w1_EFD`,
  `w3_EFD` (E, F, D), `w2_EDF` (E, D, F); 0.2's `w1/w3/w2` of the same shapes under
  `<moe>.experts`), router `<moe>.router.gate`; OLMo-core's `MoEMLP` / `DroplessMoEMLP`
  (`<moe>.experts.mlp`: `w1/w3/w2` flattened to 2-D, (E*D, F) / (E*F, D)), router
  `<moe>.router` with a flat (E*D,) weight. Views are reshapes of the storage.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sdmoe.errors import UserError

from .projections import PROJECTIONS
from .sharding import local

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


# torchtitan's GroupedExperts (0.3: shape-suffixed names; 0.2: plain), (gate, up, down) = (w1, w3, w2)
_GROUPED_NAMES = (("w1_EFD", "w3_EFD", "w2_EDF"), ("w1", "w3", "w2"))
# proj -> (host attribute, host tensor -> E x F x D view with the hidden space last)
Stacked = dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]


def _grouped(experts: nn.Module) -> tuple[Stacked, int, int, int] | None:
    """torchtitan's GroupedExperts: 3-D w1/w3 (E, F, D) and w2 (E, D, F); (storage, E, D, F)."""
    for gate, up, down in _GROUPED_NAMES:
        g, u, d = (_shape(experts, n) for n in (gate, up, down))
        if g is None or u is None or d is None or len(g) != 3 or g != u or tuple(d) != (g[0], g[2], g[1]):
            continue
        return ({"gate": (gate, lambda t: t), "up": (up, lambda t: t),
                 "down": (down, lambda t: t.transpose(-1, -2))}, g[0], g[2], g[1])
    return None


def _flat(mlp: nn.Module) -> tuple[Stacked, int, int, int] | None:
    """OLMo-core's expert MLPs: w1, w3, w2 flattened to 2-D for FSDP (experts blocked on dim 0).

    MoEMLP computes x @ w1[e] with w1 viewed (E, D, F); DroplessMoEMLP's grouped GEMM computes
    x @ w1[e]^T with w1 viewed (E, F, D); both view w2 as (E, F, D). The shapes tell them apart
    unless D == F, so the grouped GEMM (`gmm`, only on the dropless one) decides."""
    e, d, f = (getattr(mlp, a, None) for a in ("num_experts", "d_model", "hidden_size"))
    if not all(isinstance(v, int) for v in (e, d, f)):
        return None
    w1, w3, w2 = (_shape(mlp, n) for n in ("w1", "w3", "w2"))
    if w1 is None or w3 is None or w2 is None or w1 != w3 or tuple(w2) != (e * f, d):
        return None
    down = ("w2", lambda t: t.view(-1, f, d))
    if tuple(w1) == (e * f, d) and (d != f or callable(getattr(mlp, "gmm", None))):
        gate_up = lambda t: t.view(-1, f, d)  # noqa: E731
    elif tuple(w1) == (e * d, f):
        gate_up = lambda t: t.view(-1, d, f).transpose(-1, -2)  # noqa: E731
    else:
        return None
    return {"gate": ("w1", gate_up), "up": ("w3", gate_up), "down": down}, e, d, f


@dataclass
class MoEBlock:
    """One sparse MoE block of a model, with canonical access to its experts."""

    name: str  # module path, e.g. "model.layers.3.mlp"
    layer: int  # decoder layer index
    module: nn.Module  # the sparse block (router + experts [+ shared experts])
    experts: nn.Module
    router: nn.Module  # a module whose `weight` is E x D (or E*D flat): its input is the layer's input
    layout: str  # "fused" | "module_list" | "stacked"
    num_experts: int
    hidden_size: int
    expert_ffn: int
    stacked: Stacked | None = None  # the stacked layout's storage

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

    def _stacked_view(self, p: str, t: torch.Tensor | None = None) -> torch.Tensor:
        attr, view = self.stacked[p]
        return view(getattr(self.experts, attr) if t is None else t)

    def gate_EFD(self) -> torch.Tensor:
        """Gate weights (a view for fused and stacked layouts, a stacked copy for module lists)."""
        if self.layout == "fused":
            return self._fused_gate_up()[0]
        if self.layout == "stacked":
            return self._stacked_view("gate")
        return self._stack(0)

    def up_EFD(self) -> torch.Tensor:
        if self.layout == "fused":
            return self._fused_gate_up()[1]
        if self.layout == "stacked":
            return self._stacked_view("up")
        return self._stack(1)

    def down_EDF(self) -> torch.Tensor:
        if self.layout == "fused":
            w = self.experts.down_proj
            return w.transpose(1, 2) if getattr(self.experts, "is_transposed", False) else w
        if self.layout == "stacked":
            return self._stacked_view("down").transpose(1, 2)
        return self._stack(2)

    def router_ED(self) -> torch.Tensor:
        return self.router.weight.view(self.num_experts, self.hidden_size)  # OLMo-core keeps it flat

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
        if self.layout == "stacked":
            return [getattr(self.experts, self.stacked[p][0]) for p in PROJECTIONS if p in projs]
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
        if self.layout == "stacked":
            for p in PROJECTIONS:
                if p in projs and (t := get(getattr(self.experts, self.stacked[p][0]))) is not None:
                    out[p] = self._stacked_view(p, t)
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
        if self.layout == "stacked":
            for p, w in (("gate", gate_EFD), ("up", up_EFD), ("down", None if down_EDF is None else down_EDF.mT)):
                if w is not None:
                    self._stacked_view(p).copy_(w)
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
    """The module holding the router weight: `gate`, `router`, or torchtitan's `router.gate`; the
    weight is E x D, or OLMo-core's flat E*D."""
    for path in ("gate", "router", "router.gate"):
        r = block
        for attr in path.split("."):
            r = getattr(r, attr, None)
        w = getattr(r, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) in ((num_experts, hidden), (num_experts * hidden,)):
            return r
    return None


def _shape(module: nn.Module, attr: str) -> torch.Size | None:
    t = getattr(module, attr, None)
    return t.shape if isinstance(t, torch.Tensor) else None


def _experts_of(block: nn.Module) -> nn.Module | None:
    """`experts`, or torchtitan 0.3's `routed_experts.inner_experts`."""
    routed = getattr(block, "routed_experts", None)
    inner = getattr(routed, "inner_experts", None)
    return inner if isinstance(inner, nn.Module) else getattr(block, "experts", None)


def _as_block(name: str, block: nn.Module) -> MoEBlock | None:
    experts = _experts_of(block)
    if experts is None:
        return None
    stacked = None
    if (found := _grouped(experts)) is not None:
        stacked, num_experts, hidden, ffn = found
        layout = "stacked"
    elif isinstance(getattr(experts, "mlp", None), nn.Module) and (found := _flat(experts.mlp)) is not None:
        stacked, num_experts, hidden, ffn = found
        layout, experts = "stacked", experts.mlp  # OLMo-core: ParallelMLP.mlp holds the weights
    elif (shape := _shape(experts, "gate_up_proj")) is not None and len(shape) == 3:
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
    return MoEBlock(name, layer, block, experts, router, layout, num_experts, hidden, ffn, stacked)


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
            "sdmoe needs routed experts stored as fused 3-D `gate_up_proj/down_proj`, a "
            "ModuleList of `gate_proj/up_proj/down_proj` (or `w1/w3/w2`) MLPs with a router `gate`, "
            "torchtitan's GroupedExperts or OLMo-core's MoEMLP/DroplessMoEMLP"
        )
    if layers is not None:
        have = {b.layer for b in blocks}
        missing = sorted(set(layers) - have)
        if missing:
            raise UserError(f"layers {missing} hold no MoE block; MoE layers are {sorted(have)}")
        blocks = [b for b in blocks if b.layer in set(layers)]
    return blocks
