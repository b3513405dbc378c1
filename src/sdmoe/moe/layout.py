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
  `use_experts_implementation` decorator leaves on the module, and without them
  (Llama 4's experts) the two shapes tell plain from transposed. JetMoE keeps the
  same two tensors as `input_linear.weight` (E, 2F, D) and `output_linear.weight`
  (E, D, F) of the MoE block itself.
- `module_list`: an `nn.ModuleList` of per-expert MLPs with `gate_proj /
  up_proj / down_proj` (transformers 4, Qwen/DeepSeek remote code) or
  `w1 / w3 / w2` (Mixtral of transformers 4) `nn.Linear`s.
- `stacked`: one parameter per projection, experts stacked on dim 0, in the
  training stacks' own MoE modules (`sdmoe.integrations.{torchtitan,olmo_core}`):
  torchtitan's `GroupedExperts` (`<moe>.routed_experts.inner_experts`: `w1_EFD`,
  `w3_EFD` (E, F, D), `w2_EDF` (E, D, F); 0.2's `w1/w3/w2` of the same shapes under
  `<moe>.experts`), router `<moe>.router.gate`; OLMo-core's `MoEMLP` / `DroplessMoEMLP`
  (`<moe>.experts.mlp`: `w1/w3/w2` flattened to 2-D, (E*D, F) / (E*F, D)), router
  `<moe>.router` with a flat (E*D,) weight; DBRX's `<ffn>.experts.mlp` (`w1/v1/w2`, each
  (E*F, D)), router `<ffn>.router.layer`. Views are reshapes of the storage.

The router is the module whose weight is E x D. Where that weight sits inside the module
that decides (HunYuan's `gate.wg`, JetMoE's and DBRX's `router.layer`, Longcat's
`router.classifier`), or where the deciding module returns something other than
transformers 5's `(logits, scores, indices)` (Llama 4's `(scores, logits)`, JetMoE's sorted
dispatch), `MoEBlock.router` is a `RouterAdapter`: the weight, pre-hooks on the module that
owns it, and forward hooks that see `(logits, scores, indices)`.
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


def _dbrx(mlp: nn.Module) -> tuple[Stacked, int, int, int] | None:
    """DBRX's `DbrxExpertGLU`: w1 (gate), v1 (up) and w2 (down) flattened to (E*F, D); every one is read as
    (E, F, D) (`x @ w1[e].T`, `h @ w2[e]`), so the down projection's hidden-last view is w2's own."""
    e, d, f = (getattr(mlp, a, None) for a in ("moe_num_experts", "hidden_size", "ffn_hidden_size"))
    if not all(isinstance(v, int) for v in (e, d, f)):
        return None
    if any(_shape(mlp, n) != (e * f, d) for n in ("w1", "v1", "w2")):
        return None
    view = lambda t: t.view(-1, f, d)  # noqa: E731
    return {"gate": ("w1", view), "up": ("v1", view), "down": ("w2", view)}, e, d, f


# Where a block keeps fused expert tensors: (module path, gate-up attribute, module path, down attribute).
# transformers 5's experts modules, and JetMoE's `JetMoeParallelExperts` pair on the MoE block itself.
_FUSED_PLACES = (("experts", "gate_up_proj", "experts", "down_proj"),
                 ("input_linear", "weight", "output_linear", "weight"))
Place = tuple[nn.Module, str]  # (module, attribute) of a host tensor


def _fused(block: nn.Module) -> tuple[dict[str, Place], nn.Module, bool, bool, int, int, int] | None:
    """Fused experts of `block`: ({"gate_up": place, "down": place}, experts module, transposed, interleaved,
    E, D, F). Plain storage is gate_up (E, 2F, D), down (E, D, F); transposed (E, D, 2F), (E, F, D)."""
    for gu_path, gu_attr, dn_path, dn_attr in _FUSED_PLACES:
        gu_mod = _experts_of(block) if gu_path == "experts" else getattr(block, gu_path, None)
        dn_mod = gu_mod if dn_path == gu_path else getattr(block, dn_path, None)
        if not isinstance(gu_mod, nn.Module) or not isinstance(dn_mod, nn.Module):
            continue
        gu, dn = _shape(gu_mod, gu_attr), _shape(dn_mod, dn_attr)
        if gu is None or len(gu) != 3:
            continue
        e, a, b = gu
        if hasattr(gu_mod, "is_transposed"):  # use_experts_implementation says how it stores them
            transposed = bool(gu_mod.is_transposed)
        elif dn is not None and tuple(dn) == (e, b, a // 2) and a % 2 == 0:
            transposed = False
        elif dn is not None and tuple(dn) == (e, b // 2, a) and b % 2 == 0:
            transposed = True  # Llama 4: bmm(x, gate_up (E, D, 2F)), bmm(h, down (E, F, D))
        else:
            continue
        d, two_f = (a, b) if transposed else (b, a)
        experts = gu_mod if gu_path == "experts" else block
        return ({"gate_up": (gu_mod, gu_attr), "down": (dn_mod, dn_attr)}, experts, transposed,
                not getattr(gu_mod, "is_concatenated", True), e, d, two_f // 2)
    return None


@dataclass
class MoEBlock:
    """One sparse MoE block of a model, with canonical access to its experts."""

    name: str  # module path, e.g. "model.layers.3.mlp"
    layer: int  # decoder layer index
    module: nn.Module  # the sparse block (router + experts [+ shared experts])
    experts: nn.Module
    router: nn.Module | RouterAdapter  # a module whose `weight` is E x D (or E*D flat): its input is the layer's input
    layout: str  # "fused" | "module_list" | "stacked"
    num_experts: int
    hidden_size: int
    expert_ffn: int
    stacked: Stacked | None = None  # the stacked layout's storage
    fused: dict[str, Place] | None = None  # the fused layout's storage: "gate_up" and "down" places
    transposed: bool = False  # fused: gate_up (E, D, 2F) and down (E, F, D)
    interleaved: bool = False  # fused: gate and up rows alternate [g0, u0, g1, ...]

    # -- reading -----------------------------------------------------------
    def _host(self, which: str) -> torch.Tensor:
        """The fused layout's host tensor "gate_up" or "down" (looked up each time: FSDP2 replaces it)."""
        module, attr = self.fused[which]
        return getattr(module, attr)

    def _fused_gate_up(self, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._host("gate_up") if w is None else w
        if self.transposed:
            w = w.transpose(-1, -2)  # (E, 2F, D) view
        return split_gate_up(w, self.interleaved)

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
            w = self._host("down")
            return w.transpose(1, 2) if self.transposed else w
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
            names = (["gate_up"] if {"gate", "up"} & set(projs) else []) + (["down"] if "down" in projs else [])
            return [self._host(n) for n in names]
        if self.layout == "stacked":  # a host tensor once, even where it holds two projections
            attrs = dict.fromkeys(self.stacked[p][0] for p in PROJECTIONS if p in projs)
            return [getattr(self.experts, a) for a in attrs]
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
            if {"gate", "up"} & set(projs) and (gu := get(self._host("gate_up"))) is not None:
                gate, up = self._fused_gate_up(gu)
                out.update({p: v for p, v in (("gate", gate), ("up", up)) if p in projs})
            if "down" in projs and (dn := get(self._host("down"))) is not None:
                out["down"] = dn if self.transposed else dn.transpose(-1, -2)
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


# Where the router weight (E x D) sits inside the module that decides: HunYuan's `gate.wg`, JetMoE's and DBRX's
# `router.layer`, Longcat's `router.classifier`, AFMoE's `router.gate` (torchtitan's `router.gate`, beside its
# GroupedExperts, is taken as the router itself: its integration hooks it so).
_NESTED_ROUTERS = ("gate.wg", "router.layer", "router.classifier", "router.gate")


def _canonical_routing(out, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router's output as transformers 5's (logits, scores, indices): a tuple already in that form is
    returned as it is; else the logits are its last float tensor with one column per expert (Llama 4's
    `(scores, logits)`, JetMoE's `(..., logits)`, DBRX's bare logits), and the top-k of the logits are the
    experts chosen (scores: their logits)."""
    if isinstance(out, tuple) and len(out) >= 3 and isinstance(out[2], torch.Tensor) and not out[2].is_floating_point():
        return out
    parts = out if isinstance(out, tuple) else (out,)
    logits = [t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2
              and t.shape[-1] == num_experts][-1].reshape(-1, num_experts)
    scores, indices = logits.topk(top_k, dim=-1)
    return logits, scores, indices


class RouterAdapter:
    """A router whose weight lives in a submodule of the module that routes, or whose output is not
    `(logits, scores, indices)`: `weight` is the E x D weight; pre-hooks go on the module that owns it
    (its input is the layer's input, and `export` folds into its weight); forward hooks go on the routing
    module and see its output as `(logits, scores, indices)`. Forward hooks here only read: what they
    return is dropped. Other attributes (`e_score_correction_bias`) are the routing module's."""

    def __init__(self, weight_module: nn.Module, routing_module: nn.Module, num_experts: int, top_k: int):
        self.weight_module, self.routing_module = weight_module, routing_module
        self.num_experts, self.top_k = num_experts, top_k

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_module.weight

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.weight_module.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook, **kwargs):
        def canonical(*args):  # (module, args[, kwargs], output)
            hook(*args[:-1], _canonical_routing(args[-1], self.num_experts, self.top_k))

        return self.routing_module.register_forward_hook(canonical, **kwargs)

    def __getattr__(self, name: str):
        if name in ("weight_module", "routing_module", "num_experts", "top_k"):  # before __init__ (copy, pickle)
            raise AttributeError(name)
        return getattr(self.routing_module, name)


def _module_at(root: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split("."):
        root = getattr(root, attr, None)
    return root if isinstance(root, nn.Module) else None


def _router_of(block: nn.Module, num_experts: int, hidden: int, torchtitan: bool = False
               ) -> nn.Module | RouterAdapter | None:
    """The router: `gate`, `router`, or torchtitan's `router.gate`, whose weight is E x D (or OLMo-core's flat
    E*D); a `RouterAdapter` where the weight is nested (`_NESTED_ROUTERS`) or the router is a Linear with a
    forward of its own (Llama 4's returns `(scores, logits)`)."""
    def fits(module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, torch.Tensor) and tuple(w.shape) in ((num_experts, hidden), (num_experts * hidden,))

    top_k = next((k for m in (block, getattr(block, "gate", None), getattr(block, "router", None))
                  if isinstance(k := getattr(m, "top_k", None), int) and k > 0), None)
    for path in ("gate", "router", "router.gate") if torchtitan else ("gate", "router"):
        r = _module_at(block, path)
        if fits(r):
            own_forward = isinstance(r, nn.Linear) and type(r).forward is not nn.Linear.forward
            if own_forward and top_k is not None:
                return RouterAdapter(r, r, num_experts, top_k)
            return None if own_forward else r
    for path in _NESTED_ROUTERS:
        r = _module_at(block, path)
        if fits(r) and top_k is not None:
            return RouterAdapter(r, _module_at(block, path.split(".")[0]), num_experts, top_k)
    return None


def _shape(module: nn.Module, attr: str) -> torch.Size | None:
    t = getattr(module, attr, None)
    return t.shape if isinstance(t, torch.Tensor) else None


def _experts_of(block: nn.Module) -> nn.Module | None:
    """`experts`, or torchtitan 0.3's `routed_experts.inner_experts`."""
    routed = getattr(block, "routed_experts", None)
    inner = getattr(routed, "inner_experts", None)
    return inner if isinstance(inner, nn.Module) else getattr(block, "experts", None)


def _storage(block: nn.Module) -> dict | None:
    """The experts `block` holds, as MoEBlock fields (layout, experts, num_experts, hidden_size, expert_ffn
    and the layout's storage), or None."""
    experts = _experts_of(block)
    mlp = getattr(experts, "mlp", None)
    if experts is not None and (found := _grouped(experts)) is not None:  # torchtitan's GroupedExperts
        return dict(zip(("stacked", "num_experts", "hidden_size", "expert_ffn"), found), layout="stacked",
                    experts=experts, torchtitan=True)
    for flat in (_flat, _dbrx):  # OLMo-core's ParallelMLP.mlp and DBRX's DbrxExperts.mlp hold the weights
        if isinstance(mlp, nn.Module) and (found := flat(mlp)) is not None:
            return dict(zip(("stacked", "num_experts", "hidden_size", "expert_ffn"), found), layout="stacked",
                        experts=mlp)
    if (found := _fused(block)) is not None:
        fused, experts, transposed, interleaved, e, d, f = found
        return dict(layout="fused", experts=experts, fused=fused, transposed=transposed, interleaved=interleaved,
                    num_experts=e, hidden_size=d, expert_ffn=f)
    if isinstance(experts, nn.ModuleList) and len(experts) and all(_mlp_names(m) for m in experts):
        ffn, hidden = _shape(getattr(experts[0], _mlp_names(experts[0])[0]), "weight")
        return dict(layout="module_list", experts=experts, num_experts=len(experts), hidden_size=hidden,
                    expert_ffn=ffn)
    return None


def _as_block(name: str, block: nn.Module) -> MoEBlock | None:
    found = _storage(block)
    if found is None:
        return None
    router = _router_of(block, found["num_experts"], found["hidden_size"], found.pop("torchtitan", False))
    if router is None:
        return None
    match = _LAYER_INDEX.search(f".{name}.")
    return MoEBlock(name=name, layer=int(match.group(1)) if match else 0, module=block, router=router, **found)


def _why_not(model: nn.Module) -> str | None:
    """Why a model whose modules look like experts yields no MoE block: its experts are not gated, its
    router scores more than its experts, ... (None where nothing looks like experts)."""
    for name, module in model.named_modules():
        found = _storage(module)
        if found is not None:  # experts we read, but no router we know beside them
            e, d = found["num_experts"], found["hidden_size"]
            held = {id(p) for p in found["experts"].parameters()}
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
        raise UserError(
            f"no MoE layers found in {type(model).__name__} ({why}); "
            "sdmoe needs routed experts stored as fused 3-D `gate_up_proj/down_proj`, a "
            "ModuleList of `gate_proj/up_proj/down_proj` (or `w1/w3/w2`) MLPs with a router `gate`, "
            "torchtitan's GroupedExperts, OLMo-core's MoEMLP/DroplessMoEMLP or DBRX's flat w1/v1/w2"
        )
    if layers is not None:
        have = {b.layer for b in blocks}
        missing = sorted(set(layers) - have)
        if missing:
            raise UserError(f"layers {missing} hold no MoE block; MoE layers are {sorted(have)}")
        blocks = [b for b in blocks if b.layer in set(layers)]
    return blocks
