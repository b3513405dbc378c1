"""The SD-MoE decomposition of one MoE block, as `torch.nn.utils.parametrize`.

The host model's expert weights stay where its own kernel reads them
(`experts.gate_up_proj` / `experts.down_proj`, or each expert Linear's
`weight`); a parametrization materialises them from the parts:

    shared mode, full:      W_i = S + T_i                  S: F x D
    shared mode, lowrank:   W_i = A U^T + T_i              A: F x R
    per_expert mode:        W_i = A_i U^T + T_i            A_i: F x R per expert

written for every projection with the hidden space LAST ("canonical": gate /
up are F x D, down is its transpose W_down^T, also F x D). The parts live in
one `SDMoEState` module per block, registered as `<block>.sdmoe`, so their
names say what they are:

    <block>.sdmoe.shared_<p>     S or A (shared mode), <block>.sdmoe.inner_<p> (per_expert: A_i)
    <block>.sdmoe.tails_gate_up  fused tails in the host's storage layout (E x 2F x D), or
    <block>.sdmoe.tails_<p>.<i>  per-expert tails (ModuleList experts, host Linear layout)
    <block>.sdmoe.basis_<p>      U (D x R), buffer
    <block>.sdmoe.q_<p>          tracked gradient basis Q (D x (R + oversample)), buffer (per_step)
    <block>.sdmoe.router_basis   top-R data directions removed from the router input (residual router)

The parametrization's own `original` is an empty non-persistent placeholder:
state_dict() holds exactly the parts above, enough to resume bit-exactly.
During the experts' forward the materialised weights are cached
(`parametrize.cached`), so a fused kernel that indexes `gate_up_proj[i]` once
per visited expert pays for W = S + T once per step, not once per expert.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from sdmoe.errors import UserError
from sdmoe.moe.layout import MoEBlock, _mlp_names

from . import sharding

PROJ_INDEX = {"gate": 0, "up": 1, "down": 2}
STATE_NAME = "sdmoe"


class SDMoEHook:
    """Base of every hook sdmoe registers; `remove_hooks` finds them by type."""


class _CacheEnter(SDMoEHook):
    def __init__(self):
        self.ctx = None

    def __call__(self, module, args):
        self.ctx = parametrize.cached()
        self.ctx.__enter__()


class _CacheExit(SDMoEHook):
    def __init__(self, enter: _CacheEnter):
        self.enter = enter

    def __call__(self, module, args, output):
        if self.enter.ctx is not None:
            ctx, self.enter.ctx = self.enter.ctx, None
            ctx.__exit__(None, None, None)


def remove_hooks(model: nn.Module) -> int:
    """Remove every sdmoe forward (pre-)hook from every module of `model`; returns how many."""
    n = 0
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, SDMoEHook):
                    del hooks[key]
                    for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(m, extra, {}).pop(key, None)
                    n += 1
    return n


# -- storage layouts --------------------------------------------------------
class FusedLayout:
    """Canonical (hidden-last, E x F x D) views of tensors stored like the host's fused experts."""

    def __init__(self, experts: nn.Module, ffn: int):
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.concatenated = bool(getattr(experts, "is_concatenated", True))
        self.f = ffn

    def gate_up_views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gu = x.transpose(-1, -2) if self.transposed else x  # (..., 2F, D)
        if self.concatenated:
            return gu[..., : self.f, :], gu[..., self.f :, :]
        return gu[..., 0::2, :], gu[..., 1::2, :]

    def down_view(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.transposed else x.transpose(-1, -2)  # storage (..., D, F) -> (..., F, D)

    def gate_up_storage(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.concatenated:
            gu = torch.cat([gate, up], dim=-2)
        else:
            gu = torch.stack([gate, up], dim=-2).flatten(-3, -2)
        return gu.transpose(-1, -2) if self.transposed else gu

    def down_storage(self, down: torch.Tensor) -> torch.Tensor:
        return down if self.transposed else down.transpose(-1, -2)


# -- parametrizations -----------------------------------------------------
class _ExpertWeight(nn.Module):
    """W materialised from the block's SDMoEState (held by reference, not as a submodule)."""

    def __init__(self, state: "SDMoEState", host: str, index: int = -1):
        super().__init__()
        self._state = [state]  # a list: keeps the state out of this module's children / state_dict
        self.host = host
        self.index = index

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        return self._state[0].materialise(self.host, self.index)

    @property
    def shape(self) -> torch.Size:
        """W's shape (its tails'), known without materialising W: read by sdmoe.moe's layout detection."""
        return self._state[0].host_tails(self.host, self.index).shape

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        # Assigning a weight keeps the shared part and puts the rest into the tails (exact).
        self._state[0].assign(self.host, self.index, w)
        return w.new_empty(0)


def _swap_original_for_placeholder(module: nn.Module, name: str) -> None:
    plist = module.parametrizations[name]
    placeholder = plist._parameters.pop("original")
    plist.register_buffer("original", placeholder.detach().new_empty(0), persistent=False)


class SDMoEState(nn.Module):
    """Shared parts, tails, bases and tracker state of one MoE block."""

    def __init__(self, block: MoEBlock, cfg, rank: int):
        super().__init__()
        e, f, d = block.num_experts, block.expert_ffn, block.hidden_size
        self.layout = block.layout
        self.mode = cfg.mode
        self.form = cfg.shared_form if cfg.mode == "shared" else "per_expert"
        self.projs = tuple(p for p in ("gate", "up", "down") if p in cfg.projections)
        self.e, self.f, self.d, self.r = e, f, d, rank
        self.fused = FusedLayout(block.experts, f) if block.layout == "fused" else None
        ref = next(block.experts.parameters())
        dt, dev = ref.dtype, ref.device
        width = min(rank + cfg.tracker_oversample, d)
        # fused experts, full form: one shared tensor per host tensor, in the host's storage layout,
        # so W = T + S is a single broadcast add (no concatenation of gate and up in the hot path)
        self.by_host = self.layout == "fused" and self.form == "full"
        for p in self.projs:
            self.register_buffer(f"basis_{p}", torch.zeros(d, rank, dtype=torch.float32, device=dev))
            if cfg.gradient_split == "per_step":
                self.register_buffer(f"q_{p}", torch.zeros(d, width, dtype=torch.float32, device=dev))
            if self.by_host:
                continue
            shape = {"full": (f, d), "lowrank": (f, rank), "per_expert": (e, f, rank)}[self.form]
            prefix = "inner" if self.form == "per_expert" else "shared"
            setattr(self, f"{prefix}_{p}", nn.Parameter(torch.zeros(shape, dtype=dt, device=dev)))
        if self.by_host:
            if "gate" in self.projs or "up" in self.projs:
                self.shared_gate_up = nn.Parameter(torch.zeros_like(block.experts.gate_up_proj[0]))
            if "down" in self.projs:
                self.shared_down = nn.Parameter(torch.zeros_like(block.experts.down_proj[0]))
        if cfg.router_input == "residual":
            self.register_buffer("router_basis", torch.zeros(d, rank, dtype=torch.float32, device=dev))
        if self.layout == "fused":
            if "gate" in self.projs or "up" in self.projs:
                self.tails_gate_up = nn.Parameter(torch.zeros_like(block.experts.gate_up_proj))
            if "down" in self.projs:
                self.tails_down = nn.Parameter(torch.zeros_like(block.experts.down_proj))
        else:
            for p in self.projs:
                shapes = [getattr(m, _mlp_names(m)[PROJ_INDEX[p]]).weight.shape for m in block.experts]
                setattr(self, f"tails_{p}", nn.ParameterList(
                    [nn.Parameter(torch.zeros(s, dtype=dt, device=dev)) for s in shapes]))

    # -- names ----------------------------------------------------------------
    def coef(self, p: str) -> torch.Tensor:
        """Projection p's shared coefficient (S: F x D canonical view, A: F x R, or A_i: E x F x R)."""
        if self.by_host:
            return self._host_view(p, self.shared_gate_up if p != "down" else self.shared_down)
        return getattr(self, f"{'inner' if self.form == 'per_expert' else 'shared'}_{p}")

    def coef_grad(self, p: str) -> torch.Tensor | None:
        if self.by_host:
            g = (self.shared_gate_up if p != "down" else self.shared_down).grad
            return None if g is None else self._host_view(p, g)
        return self.coef(p).grad

    def shared_grads(self) -> tuple[dict[str, torch.Tensor], callable]:
        """({name: whole gradient of a shared part}, commit()); names are host names ("gate_up",
        "down") when the shared parts follow the host's storage (`by_host`), projections otherwise.

        Whole even under FSDP2, which shards these parameters on rows that cut across the
        gate/up halves or the hidden dim: they are gathered, and commit() writes this
        rank's rows back (`sharding.gathered`; unsharded, the views alias the gradients
        and commit() does nothing)."""
        if self.by_host:
            params = {h: getattr(self, f"shared_{h}", None) for h in ("gate_up", "down")}
        else:
            params = {p: self.coef(p) for p in self.projs}
        out, commits = {}, []
        for name, prm in params.items():
            if prm is not None and prm.grad is not None:
                out[name], commit = sharding.gathered(prm.grad)
                commits.append(commit)
        return out, lambda: [c() for c in commits]

    def shared_grad_view(self, grads: dict[str, torch.Tensor], p: str) -> torch.Tensor | None:
        """Projection p's canonical view (F x D ...) into `shared_grads()`'s tensors, or None."""
        if not self.by_host:
            return grads.get(p)
        g = grads.get("down" if p == "down" else "gate_up")
        return None if g is None else self._host_view(p, g)

    def _host_view(self, p: str, x: torch.Tensor) -> torch.Tensor:
        if p == "down":
            return self.fused.down_view(x)
        return self.fused.gate_up_views(x)[0 if p == "gate" else 1]

    def undecomposed_half(self) -> str | None:
        """With fused full-form shared parts, a gate/up half that is not decomposed (its shared half stays 0)."""
        if self.by_host and ("gate" in self.projs) != ("up" in self.projs):
            return "up" if "gate" in self.projs else "gate"
        return None

    def basis(self, p: str) -> torch.Tensor:
        return getattr(self, f"basis_{p}")

    def q(self, p: str) -> torch.Tensor | None:
        return getattr(self, f"q_{p}", None)

    def shared_parameters(self) -> list[nn.Parameter]:
        if self.by_host:
            return [t for t in (getattr(self, "shared_gate_up", None), getattr(self, "shared_down", None))
                    if t is not None]
        return [self.coef(p) for p in self.projs]

    def tail_parameters(self) -> list[nn.Parameter]:
        if self.layout == "fused":
            return [t for t in (getattr(self, "tails_gate_up", None), getattr(self, "tails_down", None))
                    if t is not None]
        return [t for p in self.projs for t in getattr(self, f"tails_{p}")]

    # -- forward ------------------------------------------------------------
    def contribution(self, p: str) -> torch.Tensor | None:
        """The part of W_p outside the tails, canonical (F x D, or E x F x D per expert)."""
        if p not in self.projs:
            return None
        c = self.coef(p)
        if self.form == "full":
            return c
        return c @ self.basis(p).to(c.dtype).T

    def shared_storage(self, host: str, index: int = -1) -> torch.Tensor:
        """The shared contribution to a host tensor, in the host's storage layout (broadcasts over E)."""
        if self.by_host:
            return getattr(self, f"shared_{host}")
        if self.layout == "fused":
            if host == "gate_up":
                g, u = self.contribution("gate"), self.contribution("up")
                g = torch.zeros_like(u) if g is None else g
                u = torch.zeros_like(g) if u is None else u
                return self.fused.gate_up_storage(g, u)
            return self.fused.down_storage(self.contribution("down"))
        c = self.contribution(host)
        if c.ndim == 3:
            c = c[index]
        return c.T if host == "down" else c

    def materialise(self, host: str, index: int = -1) -> torch.Tensor:
        return self.host_tails(host, index) + self.shared_storage(host, index)

    @torch.no_grad()
    def assign(self, host: str, index: int, w: torch.Tensor) -> None:
        """Tails <- W - (shared contribution): any W, exactly."""
        self.host_tails(host, index).copy_(w - self.shared_storage(host, index))

    def host_tails(self, host: str, index: int = -1) -> torch.Tensor:
        if self.layout == "fused":
            return getattr(self, f"tails_{host}")
        return getattr(self, f"tails_{host}")[index]

    # -- canonical access to the tails (for the gradient split and projections) --
    def tail_views(self, which: str) -> tuple[dict[str, torch.Tensor], callable]:
        """({p: E x F x D canonical view of the tails' grad or data}, commit()).

        FSDP2-sharded tails give this rank's experts.

        In-place edits of the views land in the tails after commit() (a no-op for
        fused experts, whose views alias the storage; ModuleList tails are stacked
        and copied back). Projections whose tails have no grad are left out.
        """
        if self.layout == "fused":
            # Under FSDP2 the fused tails are sharded on the expert dim: the local shard holds
            # whole experts, and every per-expert edit is exact on it (sharding.local).
            def canon(t: torch.Tensor | None) -> torch.Tensor | None:
                if t is None:
                    return None
                return sharding.local(t.data if which == "data" else t.grad)

            out = {}
            gu = canon(self.tails_gate_up) if ("gate" in self.projs or "up" in self.projs) else None
            if gu is not None:
                g, u = self.fused.gate_up_views(gu)
                out.update({k: v for k, v in (("gate", g), ("up", u)) if k in self.projs})
            dn = canon(self.tails_down) if "down" in self.projs else None
            if dn is not None:
                out["down"] = self.fused.down_view(dn)
            return out, lambda: None
        out, targets = {}, []
        for p in self.projs:
            ts = [t.data if which == "data" else t.grad for t in getattr(self, f"tails_{p}")]
            if any(t is None for t in ts):
                continue
            stacked = torch.stack(ts)
            out[p] = stacked.transpose(1, 2) if p == "down" else stacked
            targets.append((ts, stacked))

        def commit():
            for ts, stacked in targets:
                torch._foreach_copy_(ts, list(stacked.unbind(0)))

        return out, commit


# -- installing / removing --------------------------------------------------
def host_targets(block: MoEBlock, projs) -> list[tuple[nn.Module, str, str, int]]:
    """(module, attribute, host name, expert index) of every host tensor the decomposition replaces."""
    if block.layout == "fused":
        out = []
        if "gate" in projs or "up" in projs:
            out.append((block.experts, "gate_up_proj", "gate_up", -1))
        if "down" in projs:
            out.append((block.experts, "down_proj", "down", -1))
        return out
    out = []
    for p in ("gate", "up", "down"):
        if p in projs:
            for i, mlp in enumerate(block.experts):
                out.append((getattr(mlp, _mlp_names(mlp)[PROJ_INDEX[p]]), "weight", p, i))
    return out


def install(block: MoEBlock, state: SDMoEState) -> list[nn.Parameter]:
    """Register `state` as <block>.sdmoe and parametrize the host tensors.

    The tails get W - (shared contribution) from the state's current values
    (exact). Returns the host Parameters that were replaced (for the optimizer).
    """
    if isinstance(getattr(block.module, STATE_NAME, None), SDMoEState):
        raise UserError(f"{block.name} is already split by SD-MoE; export(model) first to split it again")
    replaced = []
    block.module.add_module(STATE_NAME, state)
    for module, attr, host, index in host_targets(block, state.projs):
        replaced.append(getattr(module, attr))
        parametrize.register_parametrization(module, attr, _ExpertWeight(state, host, index))
        _swap_original_for_placeholder(module, attr)
    if block.layout == "fused":
        enter = _CacheEnter()
        block.experts.register_forward_pre_hook(enter)
        block.experts.register_forward_hook(_CacheExit(enter), always_call=True)
    return replaced


@torch.no_grad()
def uninstall(block_module: nn.Module) -> None:
    """Write W_i back into the host's own Parameters and drop every trace of SD-MoE from the block."""
    state = getattr(block_module, STATE_NAME)
    experts = block_module.experts
    modules = [experts] if state.layout == "fused" else [m for mlp in experts for m in mlp.children()]
    for module in modules:
        if not parametrize.is_parametrized(module):
            continue
        # A deepcopy of a parametrized module shares its injected class with the original;
        # removing the property from a shared class would break the other copy: clone it.
        cls = module.__class__
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for attr in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            w = getattr(module, attr)  # left as a buffer (our placeholder was one): make it a Parameter again
            delattr(module, attr)
            setattr(module, attr, nn.Parameter(w.detach().contiguous()))
    del block_module._modules[STATE_NAME]
