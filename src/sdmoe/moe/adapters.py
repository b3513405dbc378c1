"""The layout adapters: how E experts' gate, up and down projections are kept, and their canonical views.

Three ways of keeping experts, one small class each, one interface (`LayoutAdapter`):

| class               | layout        | host tensors                                                       |
|---------------------|---------------|--------------------------------------------------------------------|
| `FusedExperts`      | "fused"       | gate_up (E, 2F, D) [gate; up] or interleaved, down (E, D, F); or both transposed |
| `StackedExperts`    | "stacked"     | one tensor per projection, (E, F, D) / (E, D, F), or flat (E*F, D) / (E*D, F)    |
| `ModuleListExperts` | "module_list" | one Linear per expert and projection, weight (F, D) / down (D, F)  |

Every adapter reads its host tensors into the canonical shape, hidden space last:

    gate, up, down : E x F x D      (down_EDF, the stored form, is down's transpose)

fused and stacked as views that alias the storage, module lists as stacked copies that a `commit`
writes back. The host tensors are wherever `places` says: `(module, attribute)` in a live model
(`find_layout`), a tensor's name in a checkpoint (`saved_layouts`); a `fetch` turns a place into the
tensor to read (the weight, its gradient, a local shard, a tensor read from disk), so one adapter
serves the model, its gradients, FSDP2's shards and the files.

What differs between libraries and families is a parameter, never a branch: where the tensors sit
(`FusedExperts.PLACES`, `STACKS`, `MLP_NAMES`), each tensor's `Orientation` (hidden space last or
first, flat on dim 0, gate and up halves or interleaved) and where the router may sit (`router_paths`).
The names on disk are these same names (with the few that transformers saves differently listed
beside them), so the checkpoint reader (`sdmoe.moe.checkpoint`) knows no name of its own.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sdmoe.errors import UserError

from .projections import PROJECTIONS

Place = Hashable  # where a host tensor is: (module, attribute) in a live model, its name in a checkpoint
Fetch = Callable[[Place], "torch.Tensor | None"]  # a place -> the tensor to read (None: a gradient not there yet)

# Where the router may sit under the MoE block, the module whose weight is E x D (transformers' TopKRouter
# `gate` or `router`, Mixtral's Linear `gate`).
ROUTER_PATHS = ("gate", "router")
# Where a router weight sits inside the module that decides: HunYuan's `gate.wg`, JetMoE's and DBRX's
# `router.layer`, Longcat's `router.classifier`, AFMoE's `router.gate` (`sdmoe.moe.routers.RouterAdapter`).
NESTED_ROUTERS = ("gate.wg", "router.layer", "router.classifier", "router.gate")
# Model types whose checkpoints keep fused gate and up rows interleaved [g0, u0, g1, ...]: gpt-oss in memory
# too (`use_experts_implementation(is_concatenated=False)`, a flag only the built module carries), Inkling 2's
# `w13_weight` on disk only (transformers de-interleaves it on load). Shapes cannot tell; the model type does.
SAVED_INTERLEAVED = frozenset({"gpt_oss", "inkling2_text", "inkling2_loop_text"})


def split_gate_up(gate_up: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves (views) of a fused (..., 2F, D) tensor: [gate; up] or interleaved [g0, u0, g1, ...]."""
    if interleaved:
        return gate_up[..., 0::2, :], gate_up[..., 1::2, :]
    f = gate_up.shape[-2] // 2
    return gate_up[..., :f, :], gate_up[..., f:, :]


@dataclass(frozen=True)
class Orientation:
    """How one host tensor holds its projection (or gate and up both), against the canonical E x F x D.

    hidden_last: rows are ffn units, (E, F, D); False: (E, D, F) (down's usual storage, Llama 4's gate_up).
    flat: 2-D with the experts blocked on dim 0, (E*F, D) or (E*D, F) (OLMo-core, DBRX): FSDP2 shards rows.
    pair: the tensor holds gate and up, "halves" [gate; up] or "interleaved" [g0, u0, g1, u1, ...]."""

    hidden_last: bool = True
    flat: bool = False
    pair: str | None = None

    def canonical(self, t: torch.Tensor, ffn: int, hidden: int) -> tuple[torch.Tensor, ...]:
        """Views of `t` in the canonical E x F x D: (gate, up) for a pair, (projection,) otherwise. Flat
        storage is viewed with -1 experts, so a local shard of whole experts is read as those experts."""
        if self.flat:
            t = t.view(-1, ffn, hidden) if self.hidden_last else t.view(-1, hidden, ffn)
        if not self.hidden_last:
            t = t.transpose(-1, -2)
        return split_gate_up(t, self.pair == "interleaved") if self.pair else (t,)

    def __str__(self) -> str:  # the stored shape in letters: "(E, D, 2F) interleaved", "(E*F, D)"
        rows = "2F" if self.pair else "F"
        dims = (rows, "D") if self.hidden_last else ("D", rows)
        shape = f"(E*{dims[0]}, {dims[1]})" if self.flat else f"(E, {dims[0]}, {dims[1]})"
        return f"{shape} {self.pair}" if self.pair == "interleaved" else shape

    def shape(self, e: int, ffn: int, hidden: int) -> tuple[int, ...]:
        """The stored shape of E experts of this orientation."""
        rows = 2 * ffn if self.pair else ffn
        if self.flat:
            return (e * rows, hidden) if self.hidden_last else (e * hidden, rows)
        return (e, rows, hidden) if self.hidden_last else (e, hidden, rows)


def _nothing() -> None:
    """The commit of views that alias the storage: an edit of them is already in it."""


class LayoutAdapter:
    """One block's experts as a layout keeps them: sizes, places, orientations; canonical views of them.

    kind: "fused" | "stacked" | "module_list" (`MoEBlock.layout`); experts: the module that holds them
    (None for a checkpoint's); router_paths: where, under the block, the router may sit."""

    kind: ClassVar[str]
    router_paths: tuple[str, ...] = ROUTER_PATHS

    def __init__(self, num_experts: int, hidden_size: int, expert_ffn: int, experts: nn.Module | None = None):
        self.num_experts, self.hidden_size, self.expert_ffn, self.experts = num_experts, hidden_size, expert_ffn, experts

    def host(self, projs=PROJECTIONS) -> list[Place]:
        """The places of the host tensors that hold projections `projs`, each once, in projection order."""
        raise NotImplementedError

    def views(self, fetch: Fetch, projs=PROJECTIONS) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """({p: E x F x D} of the fetched host tensors, commit()): views that alias them (commit does
        nothing) or copies (commit writes them back). A projection whose tensor fetches as None is left out."""
        raise NotImplementedError

    @classmethod
    def find(cls, block: nn.Module) -> LayoutAdapter | None:
        """This layout's adapter of the experts a live MoE block holds, or None where it does not keep them."""
        raise NotImplementedError

    @classmethod
    def saved(cls, names: dict[str, str], shape: Callable[[str], tuple[int, ...]], model_type: str | None,
              router_rows: int | None) -> LayoutAdapter | None:
        """This layout's adapter of one block of a checkpoint, or None: `names` maps the tensor names under the
        block (the same names as in memory, or those `SAVED` lists) to their keys, `shape(key)` reads a shape
        from the file's header; the model type and the router's rows say what the shapes cannot."""
        raise NotImplementedError

    def copies(self, fetch: Fetch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All three projections as new contiguous E x F x D tensors of `dtype`, one copy each (a checkpoint's
        layer in the analysis' dtype: `.to` alone would keep a transposed view's strides)."""
        views, _ = self.views(fetch)
        return {p: v.to(dtype, memory_format=torch.contiguous_format) for p, v in views.items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(E={self.num_experts}, D={self.hidden_size}, F={self.expert_ffn}, "
                f"{self.describe()})")

    def describe(self) -> str:
        """The storage in words (names, shapes, orientation), for errors and reprs."""
        raise NotImplementedError


class _TensorLayout(LayoutAdapter):
    """Experts kept in a few tensors (fused or stacked): `places[role]` and `orientation[role]` per host
    tensor, and `holds[p] = (role, index)`: the tensor holding projection p, and its index in that tensor's
    canonical views (a fused gate_up gives gate and up)."""

    holds: ClassVar[dict[str, tuple[str, int]]]

    def __init__(self, places: dict[str, Place], orientation: dict[str, Orientation], num_experts: int,
                 hidden_size: int, expert_ffn: int, experts: nn.Module | None = None):
        super().__init__(num_experts, hidden_size, expert_ffn, experts)
        self.places, self.orientation = places, orientation

    def _roles(self, projs) -> list[str]:
        return list(dict.fromkeys(self.holds[p][0] for p in PROJECTIONS if p in projs))

    def host(self, projs=PROJECTIONS) -> list[Place]:
        return [self.places[role] for role in self._roles(projs)]

    def views(self, fetch: Fetch, projs=PROJECTIONS) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        read = {}
        for role in self._roles(projs):
            t = fetch(self.places[role])
            if t is not None:
                read[role] = self.orientation[role].canonical(t, self.expert_ffn, self.hidden_size)
        out = {}
        for p in PROJECTIONS:
            role, i = self.holds[p]
            if p in projs and role in read:
                out[p] = read[role][i]
        return out, _nothing

    def describe(self) -> str:
        return ", ".join(f"{_name(self.places[r])} {o}" for r, o in self.orientation.items())


def _name(place: Place) -> str:
    return f"{type(place[0]).__name__}.{place[1]}" if isinstance(place, tuple) else str(place)


def _module_at(root: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split(".") if path else ():
        root = getattr(root, attr, None)
    return root if isinstance(root, nn.Module) else None


def _shape(module: nn.Module | None, attr: str) -> tuple[int, ...] | None:
    t = getattr(module, attr, None)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _owner(block: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    """(module, attribute) of a dotted path under `block`."""
    head, _, attr = path.rpartition(".")
    return _module_at(block, head), attr


# -- fused -------------------------------------------------------------------------------------------------------
class FusedExperts(_TensorLayout):
    """gate and up in one tensor, down in another: transformers 5's experts modules (`gate_up_proj` (E, 2F, D),
    `down_proj` (E, D, F)), transposed ((E, D, 2F), (E, F, D): Llama 4, Aria, gpt-oss), gate and up interleaved
    (gpt-oss), or JetMoE's pair of `ParallelExperts` on the block itself. Transposed or not, the two shapes
    say (only one reading makes down's shape match gate_up's); interleaving, the module's flag says (on disk,
    the model type: `SAVED_INTERLEAVED`)."""

    kind = "fused"
    holds = {"gate": ("gate_up", 0), "up": ("gate_up", 1), "down": ("down", 0)}
    # (gate_up, down) paths under the block, in memory: transformers 5's experts, JetMoE's ParallelExperts pair
    PLACES = (("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight"))
    # ... and on disk, where transformers' conversion mapping saves them otherwise: Aria's fc1/fc2, Inkling 2's
    # w13/w2 (Granite MoE's experts save as the JetMoE pair's names)
    SAVED = PLACES + (("experts.fc1.weight", "experts.fc2.weight"), ("experts.w13_weight", "experts.w2_weight"))

    def __init__(self, gate_up: Place, down: Place, transposed: bool, interleaved: bool, num_experts: int,
                 hidden_size: int, expert_ffn: int, experts: nn.Module | None = None):
        orientation = {"gate_up": Orientation(not transposed, pair="interleaved" if interleaved else "halves"),
                       "down": Orientation(transposed)}
        super().__init__({"gate_up": gate_up, "down": down}, orientation, num_experts, hidden_size, expert_ffn,
                         experts)
        self.transposed, self.interleaved = transposed, interleaved

    @staticmethod
    def fit(gate_up: tuple[int, ...] | None, down: tuple[int, ...] | None) -> tuple[bool, int, int, int] | None:
        """(transposed, E, D, F) of a fused pair of these shapes, or None: plain is gate_up (E, 2F, D) with down
        (E, D, F), transposed (E, D, 2F) with (E, F, D); both cannot hold at once (down's second dim would be
        both D and D/2), so the shapes decide even where D == F (gpt-oss)."""
        if gate_up is None or down is None or len(gate_up) != 3:
            return None
        e, a, b = gate_up
        if tuple(down) == (e, b, a // 2) and a % 2 == 0:
            return False, e, b, a // 2
        if tuple(down) == (e, b // 2, a) and b % 2 == 0:
            return True, e, a, b // 2
        return None

    @classmethod
    def find(cls, block: nn.Module) -> FusedExperts | None:
        for gate_up_path, down_path in cls.PLACES:
            (gu_mod, gu_attr), (dn_mod, dn_attr) = _owner(block, gate_up_path), _owner(block, down_path)
            found = cls.fit(_shape(gu_mod, gu_attr), _shape(dn_mod, dn_attr))
            if found is None:
                continue
            transposed, e, d, f = found
            # the module holding both: the experts module, or the block itself for JetMoE's pair
            experts = gu_mod if gu_mod is dn_mod else block
            interleaved = not getattr(gu_mod, "is_concatenated", True)  # use_experts_implementation's flag
            return cls((gu_mod, gu_attr), (dn_mod, dn_attr), transposed, interleaved, e, d, f, experts)
        return None

    @classmethod
    def saved(cls, names, shape, model_type, router_rows) -> FusedExperts | None:
        for gate_up_name, down_name in cls.SAVED:
            if gate_up_name in names and down_name in names:
                gu, dn = names[gate_up_name], names[down_name]
                found = cls.fit(shape(gu), shape(dn))
                if found is not None:
                    transposed, e, d, f = found
                    return cls(gu, dn, transposed, model_type in SAVED_INTERLEAVED, e, d, f)
        return None


# -- stacked ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stack:
    """One library's experts kept as one tensor per projection, under `owner` (a path under the block).

    names: the (gate, up, down) attributes; hidden_last: each one's orientation (None: told by the shapes,
    OLMo-core's w1/w3, which where D == F only its grouped GEMM `gmm` decides); sizes: the owner's attributes
    holding (E, D, F) of flat storage; routers: where the router may sit."""

    owner: str
    names: tuple[str, str, str]
    hidden_last: tuple[bool | None, bool | None, bool]
    sizes: tuple[str, str, str] | None = None
    routers: tuple[str, ...] = ROUTER_PATHS
    what: str = ""

    @property
    def flat(self) -> bool:
        return self.sizes is not None


# torchtitan's router is the Linear `router.gate` beside its GroupedExperts (its integration hooks it so).
_TORCHTITAN_ROUTERS = (*ROUTER_PATHS, "router.gate")
STACKS = (
    # torchtitan 0.3's GroupedExperts (shape-suffixed names) and 0.2's (plain), (gate, up, down) = (w1, w3, w2)
    Stack("routed_experts.inner_experts", ("w1_EFD", "w3_EFD", "w2_EDF"), (True, True, False),
          routers=_TORCHTITAN_ROUTERS, what="torchtitan's GroupedExperts"),
    Stack("experts", ("w1", "w3", "w2"), (True, True, False), routers=_TORCHTITAN_ROUTERS,
          what="torchtitan's GroupedExperts"),
    # OLMo-core's MoEMLP (x @ w1[e], w1 viewed (E, D, F)) and DroplessMoEMLP (grouped GEMM, x @ w1[e]^T with w1
    # viewed (E, F, D)); both view w2 as (E, F, D)
    Stack("experts.mlp", ("w1", "w3", "w2"), (None, None, True), ("num_experts", "d_model", "hidden_size"),
          what="OLMo-core's MoEMLP/DroplessMoEMLP"),
    # DBRX's DbrxExpertGLU: w1 (gate), v1 (up), w2 (down), each (E*F, D) (`x @ w1[e].T`, `h @ w2[e]`)
    Stack("experts.mlp", ("w1", "v1", "w2"), (True, True, True), ("moe_num_experts", "hidden_size",
                                                                   "ffn_hidden_size"), what="DBRX's flat w1/v1/w2"),
)


class StackedExperts(_TensorLayout):
    """One tensor per projection, experts on dim 0 (torchtitan's GroupedExperts) or blocked on the rows of a
    flat 2-D tensor (OLMo-core's expert MLPs, DBRX): `STACKS`."""

    kind = "stacked"
    holds = {p: (p, 0) for p in PROJECTIONS}

    def __init__(self, places: dict[str, Place], orientation: dict[str, Orientation], num_experts: int,
                 hidden_size: int, expert_ffn: int, experts: nn.Module | None = None, stack: Stack | None = None):
        super().__init__(places, orientation, num_experts, hidden_size, expert_ffn, experts)
        self.stack = stack
        if stack is not None:
            self.router_paths = stack.routers

    @staticmethod
    def fit(stack: Stack, shapes: list[tuple[int, ...] | None], sizes: tuple[int, int, int] | None,
            grouped_gemm: bool = False) -> tuple[list[Orientation], int, int, int] | None:
        """(orientations, E, D, F) of a stack's (gate, up, down) shapes, or None where they do not fit. Flat
        storage needs `sizes` (E, D, F), or at least E with D and F left 0 (read off the shapes)."""
        if any(s is None or len(s) != (2 if stack.flat else 3) for s in shapes):
            return None
        if stack.flat:
            e, d, f = sizes
            d = d or shapes[2][1]  # down is (E*F, D) in both stacks read flat
            f = f or shapes[2][0] // e
        else:
            e, f, d = shapes[0] if stack.hidden_last[0] else (shapes[0][0], shapes[0][2], shapes[0][1])
        if shapes[0] != shapes[1]:  # gate and up alike
            return None
        out = []
        for s, hidden_last in zip(shapes, stack.hidden_last):
            if hidden_last is None:  # OLMo-core's w1/w3: the shape says, and where D == F the grouped GEMM
                hidden_last = tuple(s) == (e * f, d) and (d != f or grouped_gemm)
            o = Orientation(hidden_last, flat=stack.flat)
            if tuple(s) != o.shape(e, f, d):
                return None
            out.append(o)
        return out, e, d, f

    @classmethod
    def find(cls, block: nn.Module) -> StackedExperts | None:
        for stack in STACKS:
            owner = _module_at(block, stack.owner)
            if owner is None:
                continue
            sizes = None
            if stack.flat:
                sizes = tuple(getattr(owner, a, None) for a in stack.sizes)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
                    continue
            found = cls.fit(stack, [_shape(owner, n) for n in stack.names], sizes,
                            callable(getattr(owner, "gmm", None)))
            if found is not None:
                orientation, e, d, f = found
                return cls({p: (owner, n) for p, n in zip(PROJECTIONS, stack.names)},
                           dict(zip(PROJECTIONS, orientation)), e, d, f, owner, stack)
        return None

    @classmethod
    def saved(cls, names, shape, model_type, router_rows) -> StackedExperts | None:
        """Stacks whose names fix every orientation (not OLMo-core's, which its module decides); flat ones take
        E from the router's rows."""
        for stack in STACKS:
            keys = [names.get(f"{stack.owner}.{n}") for n in stack.names]
            if None in keys or None in stack.hidden_last or (stack.flat and not router_rows):
                continue
            found = cls.fit(stack, [shape(k) for k in keys], (router_rows, 0, 0) if stack.flat else None)
            if found is not None:
                orientation, e, d, f = found
                return cls(dict(zip(PROJECTIONS, keys)), dict(zip(PROJECTIONS, orientation)), e, d, f, None, stack)
        return None

    def describe(self) -> str:
        return f"{self.stack.what if self.stack else 'stacked'}: {super().describe()}"


# -- module list --------------------------------------------------------------------------------------------------
# (gate, up, down) attribute names of a per-expert MLP, in order of preference.
MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def mlp_names(mlp: nn.Module) -> tuple[str, str, str] | None:
    """The (gate, up, down) Linears of a per-expert MLP, or None."""
    for names in MLP_NAMES:
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            return names
    return None


class ModuleListExperts(LayoutAdapter):
    """An `nn.ModuleList` of per-expert MLPs with `gate_proj / up_proj / down_proj` (transformers 4, Qwen and
    DeepSeek remote code) or Mixtral's `w1 / w3 / w2` Linears; what `save_pretrained` writes for most families
    (`experts.<i>.gate_proj.weight`). Views are stacked copies; commit() writes them back."""

    kind = "module_list"

    def __init__(self, places: dict[str, list[Place]], num_experts: int, hidden_size: int, expert_ffn: int,
                 experts: nn.Module | None = None):
        super().__init__(num_experts, hidden_size, expert_ffn, experts)
        self.places = places  # projection -> one place per expert

    def host(self, projs=PROJECTIONS) -> list[Place]:
        return [place for p in PROJECTIONS if p in projs for place in self.places[p]]

    def views(self, fetch: Fetch, projs=PROJECTIONS) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        out, targets = {}, []
        for p in PROJECTIONS:
            if p not in projs:
                continue
            ts = [fetch(place) for place in self.places[p]]
            if any(t is None for t in ts):
                continue
            stacked = torch.stack(ts)
            out[p] = stacked.transpose(1, 2) if p == "down" else stacked
            targets.append((ts, stacked))

        def commit() -> None:
            for ts, stacked in targets:
                torch._foreach_copy_(ts, list(stacked.unbind(0)))

        return out, commit

    def copies(self, fetch: Fetch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # each expert converted while copied into one buffer per projection: no stacked copy at the
        # stored dtype first (a checkpoint's layer may be most of the memory)
        e, f, d = self.num_experts, self.expert_ffn, self.hidden_size
        out = {p: torch.empty(e, f, d, dtype=dtype) for p in PROJECTIONS}
        for p in PROJECTIONS:
            for i, place in enumerate(self.places[p]):
                w = fetch(place)
                out[p][i].copy_(w.T if p == "down" else w)
        return out

    @classmethod
    def find(cls, block: nn.Module) -> ModuleListExperts | None:
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.ModuleList) or not len(experts):
            return None
        names = [mlp_names(mlp) for mlp in experts]
        if not all(names):
            return None
        places = {p: [(getattr(mlp, n[i]), "weight") for mlp, n in zip(experts, names)]
                  for i, p in enumerate(PROJECTIONS)}
        f, d = experts[0].get_submodule(names[0][0]).weight.shape
        return cls(places, len(experts), d, f, experts)

    # the names of one expert's projections under the block, on disk as in memory
    NAME = re.compile(r"^experts\.(?P<i>\d+)\.(?P<name>" + "|".join(n for ns in MLP_NAMES for n in ns) + r")\.weight$")

    @classmethod
    def saved(cls, names, shape, model_type, router_rows) -> ModuleListExperts | None:
        """One line where the experts' ids have holes: a download cut short."""
        found: dict[tuple[str, str, str], dict[str, dict[int, str]]] = {}
        for name, key in names.items():
            m = cls.NAME.match(name)
            if m:
                mlp = next(ns for ns in MLP_NAMES if m["name"] in ns)
                found.setdefault(mlp, {}).setdefault(PROJECTIONS[mlp.index(m["name"])], {})[int(m["i"])] = key
        for mlp, by_proj in found.items():
            if set(by_proj) != set(PROJECTIONS):
                continue
            ids = set(by_proj["gate"])
            if ids != set(by_proj["up"]) or ids != set(by_proj["down"]) or ids != set(range(len(ids))):
                raise UserError(f"experts {'/'.join(mlp)} are incomplete (expert ids {sorted(ids)[:8]}...); "
                                "re-download the checkpoint")
            f, d = shape(by_proj["gate"][0])
            if shape(by_proj["up"][0]) != (f, d) or shape(by_proj["down"][0]) != (d, f):
                continue
            places = {p: [by_proj[p][i] for i in range(len(ids))] for p in PROJECTIONS}
            return cls(places, len(ids), d, f)
        return None

    def describe(self) -> str:
        return f"{self.num_experts} x {', '.join(_name(self.places[p][0]) for p in PROJECTIONS)}"


# Tried in this order on every module: a stack's names are the most specific, a module list the least.
LAYOUTS: tuple[type[LayoutAdapter], ...] = (StackedExperts, FusedExperts, ModuleListExperts)
# What each layout reads, for the error a model without MoE layers gets.
READ = ("fused 3-D `gate_up_proj/down_proj` (or transposed, interleaved, JetMoE's `input_linear/output_linear`), "
        "a ModuleList of `gate_proj/up_proj/down_proj` (or `w1/w3/w2`) MLPs with a router `gate`, "
        + ", ".join(dict.fromkeys(s.what for s in STACKS)))


def find_layout(block: nn.Module) -> LayoutAdapter | None:
    """The experts `block` holds, through the first layout that reads them, or None."""
    for layout in LAYOUTS:
        found = layout.find(block)
        if found is not None:
            return found
    return None


def saved_layout(names: dict[str, str], shape, model_type: str | None, router_rows: int | None
                 ) -> LayoutAdapter | None:
    """The experts of one block of a checkpoint: `names` maps the tensor names under the block to their keys,
    `shape(key)` reads a shape; None where no layout reads them."""
    for layout in LAYOUTS:
        found = layout.saved(names, shape, model_type, router_rows)
        if found is not None:
            return found
    return None


@functools.cache
def saved_suffixes() -> re.Pattern:
    """The tensor names, after a block's name, that hold experts in some layout on disk: `<block>.<suffix>`."""
    fixed = [n for pair in FusedExperts.SAVED for n in pair]
    fixed += [f"{s.owner}.{n}" for s in STACKS if None not in s.hidden_last for n in s.names]
    listed = ModuleListExperts.NAME.pattern.strip("^$")
    return re.compile(r"^(?P<block>.+)\.(?P<suffix>" + "|".join(map(re.escape, fixed)) + "|" + listed + r")$")


def router_names() -> tuple[str, ...]:
    """The router weight's names after a block's name, on disk as in memory."""
    paths = (*ROUTER_PATHS, *(p for s in STACKS for p in s.routers), *NESTED_ROUTERS)
    return tuple(f"{p}.weight" for p in dict.fromkeys(paths))
