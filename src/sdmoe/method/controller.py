"""`SDMoE`: SD-MoE as a transform of gradients and an optimizer-side shared update.

The host model stays a plain transformers model at every step: its expert weights
W_i are its own parameters, trained by its own optimizer. What SD-MoE adds lives
here, outside the model:

- per layer and projection: the basis U (D x R), the tracked basis Q (per_step), the
  shared part (S, A or A_i; `core.shared_at_split`), kept so the tails T_i = W_i - C_i
  can be measured and re-projected;
- a zero "shared delta" per shared part, trained by a second optimizer of the host
  optimizer's kind: its moments are exactly the shared part's, and its step is added
  to every expert after the host optimizer's step (`core.fold_shared`).

Three events drive it, from any training loop (`sdmoe train`, the Trainer callback,
DDP, FSDP2):

    ctl = SDMoE(model, cfg)
    for step in range(steps):
        ctl.before_forward(step, optimizer, reference_batch)  # split when due; collection windows
        loss = ...; loss.backward()
        ctl.after_backward(step)           # split the gradients; BEFORE clipping
        ctl.clip_grad_norm_(max_norm)      # the model's gradients and the shared ones, as one vector
        optimizer.step()
        ctl.after_optimizer_step(step)     # shared update folded in; re-projection; re-estimation
        optimizer.zero_grad()

Why this is the same method as W_i = C + T_i with C and T_i as parameters: AdamW is
elementwise and its weight decay is linear, so the tails' update is AdamW on the tails'
gradients applied to W_i, and the shared part's update is AdamW on the shared gradient
applied to a parameter that starts every step at zero. The one difference, the weight
decay of C at the shared learning rate instead of the tails', is added back in
`after_optimizer_step` (zero when the two rates are equal). Like the tails of a fresh
parameter, the experts' optimizer state is reset at the split.

Resume: save `state_dict()` (tensors: torch.save-able with weights_only=True); on a
fresh model, `load_state_dict(sd, optimizer)` rebuilds the split, binds the optimizer
and restores the shared optimizer's state; then load the host optimizer's state.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe import MoEBlock, find_moe_blocks
from sdmoe.moe.forward import logits
from sdmoe.moe.sharding import local, unsharded, whole
from sdmoe.spectral import data_subspace, expert_subspaces, mean_off_diagonal, overlap_matrix

from . import core, sharding
from .basis import Collector, choose_bases, gram
from .config import SDMoEConfig
from .export import export
from .hooks import SPLIT_BY
from .router import ResidualRouterInput, fold

STATE_VERSION = 2  # 1: the parametrization engine of sdmoe 0.1 (not readable here)


class _Layer:
    """One MoE block's SD-MoE state (all tensors outside the model)."""

    def __init__(self, block: MoEBlock, cfg: SDMoEConfig, form: str, rank: int, width: int):
        self.block, self.r, self.form = block, rank, form
        self.projs = tuple(p for p in ("gate", "up", "down") if p in cfg.projections)
        e, f, d = block.num_experts, block.expert_ffn, block.hidden_size
        ref = next(block.experts.parameters())
        dt, dev = ref.dtype, ref.device
        self.basis = {p: torch.zeros(d, rank, dtype=torch.float32, device=dev) for p in self.projs}
        # the ffn side's basis of a two-sided split (P_F = basis_f basis_f^T)
        self.basis_f = ({p: torch.zeros(f, rank, dtype=torch.float32, device=dev) for p in self.projs}
                        if cfg.projection_sides == "two" else {})
        # the tracked bases of all projections in one (P, D, X) buffer: the tracker's batched QR writes it
        # in place; `q` gives each projection's (D, X) view of it
        self.q_PDX = (torch.zeros(len(self.projs), d, width, dtype=torch.float32, device=dev)
                      if cfg.gradient_split == "per_step" else None)
        shape = {"full": (f, d), "lowrank": (f, rank), "per_expert": (e, f, rank)}[form]
        self.shared = {p: torch.zeros(shape, dtype=dt, device=dev) for p in self.projs}
        self.delta = {p: nn.Parameter(torch.zeros(shape, dtype=dt, device=dev)) for p in self.projs}
        self.router_basis = (torch.zeros(d, rank, dtype=torch.float32, device=dev)
                             if cfg.router_input == "residual" else None)

    @property
    def q(self) -> dict[str, torch.Tensor]:
        """Each projection's tracked basis (D x X), a view of `q_PDX` ({} unless the split is per_step)."""
        return {} if self.q_PDX is None else dict(zip(self.projs, self.q_PDX.unbind(0)))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state to save, by name (the q_* are views of one buffer: load them with copy_)."""
        out = {}
        for name in ("basis", "basis_f", "q", "shared"):
            out.update({f"{name}_{p}": t for p, t in getattr(self, name).items()})
        if self.router_basis is not None:
            out["router_basis"] = self.router_basis
        return out

    def owned(self) -> list[torch.Tensor]:
        """Every tensor this layer allocated (what `SDMoE.to` moves), deltas included."""
        out = [*self.basis.values(), *self.basis_f.values(), *self.shared.values(), *self.delta.values()]
        return out + [t for t in (self.q_PDX, self.router_basis) if t is not None]

    def contribution(self, p: str) -> torch.Tensor:
        return core.shared_contribution(self.shared[p], self.basis[p], self.form)

    def stacked(self, name: str, projs: tuple[str, ...]) -> torch.Tensor | None:
        """basis or basis_f of `projs` as one (P, n, R) tensor (None where the layer has none)."""
        bases = getattr(self, name)
        return torch.stack([bases[p] for p in projs]) if bases else None


class SDMoE:
    """SD-MoE on a transformers MoE model: the gradient split and the shared update, driven by three events."""

    def __init__(self, model: nn.Module, cfg: SDMoEConfig):
        if not isinstance(cfg, SDMoEConfig):
            raise UserError(f"cfg must be an SDMoEConfig, got {type(cfg).__name__}")
        cfg.validate()
        if model in SPLIT_BY:
            raise UserError("this model is already split by another SDMoE; use that one, or export(model) first to "
                            "split it again")
        self.model, self.cfg = model, cfg
        self.form = cfg.form
        self.blocks = find_moe_blocks(model)
        self.ranks = cfg.resolve_ranks(self.blocks[0].hidden_size, len(self.blocks))
        f = self.blocks[0].expert_ffn
        if cfg.projection_sides == "two" and max(self.ranks) >= f:
            raise UserError(f"a two-sided split of rank {max(self.ranks)} needs a larger expert ffn width than "
                            f"F={f}; lower sdmoe.rank below {f}")
        self.refreshed_at: list[int] = []  # steps after which the bases were refreshed (refresh_every)
        self.split_done = False
        self.layers: list[_Layer] = []
        self.shared_optimizer: torch.optim.Optimizer | None = None
        # the host optimizer and the index of the group that trains the experts (an index, not the dict:
        # Optimizer.load_state_dict replaces the group dicts, and FSDP2 sharding replaces the parameters)
        self._host: tuple[torch.optim.Optimizer, int] | None = None
        self._drift: dict[str, torch.Tensor] = {}
        self._router_hooks: list = []
        need_grads = cfg.basis_source == "gradients"
        need_inputs = cfg.basis_source == "activations" or cfg.router_input == "residual"
        self.collector = Collector(self.blocks, need_grads, need_inputs)
        self._reproject = cfg.gradient_split == "fixed" or (self.form == "per_expert" and cfg.gradient_split != "none")
        self._sync_hooks(0)

    # -- event 1: before the forward ------------------------------------------------------------
    def before_forward(self, step: int, optimizer: torch.optim.Optimizer | None = None,
                       reference_batch=None) -> dict | None:
        """At step >= split_step: split (and bind `optimizer`); returns the split record. Before it:
        open or close the collection windows the basis source needs."""
        if self.split_done:
            return None
        if step < self.cfg.split_step:
            self._sync_hooks(step)
            return None
        record = self.split(reference_batch)
        if optimizer is not None:
            self.bind_optimizer(optimizer)
        return record

    # -- event 2: after the backward, before clipping ---------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Before the split: accumulate what the basis source needs. After it: split every expert's
        gradient into its tail (in place) and hand the shared part's gradient to its delta. No host syncs.

        On FSDP2-sharded experts: tails on the local experts, the tracker's M Q and the shared
        gradient summed over the ranks (`sharding.reducer`)."""
        if not self.split_done:
            if self._in_window(step):
                self.collector.add_grads()
            self._sync_hooks(step + 1)
            return
        cfg = self.cfg
        collect = self._in_window(step) and self.collector.need_grads
        exact = cfg.gradient_split == "per_step" and cfg.exact_every and step % cfg.exact_every == 0
        for li, layer in enumerate(self.layers):
            views, commit = layer.block.views("grad", layer.projs)
            if collect:
                for p, g in views.items():
                    self.collector.grads[(li, p)] = self.collector.grads.get((li, p), 0) + gram(g)
            projs = tuple(p for p in layer.projs if p in views)
            if projs:
                reduce = sharding.reducer(layer.block.host_parameters(layer.projs)[0].grad)
                shared = self._split(li, layer, projs, [views[p] for p in projs], exact, reduce)
                for k, p in enumerate(projs):
                    layer.delta[p].grad = shared[:, k] if self.form == "per_expert" else shared[k]
            commit()
        if collect:
            self.collector.grad_batches += 1

    def _split(self, li: int, layer: _Layer, projs: tuple[str, ...], gs: list[torch.Tensor], exact: bool,
               reduce) -> torch.Tensor:
        """Split one layer's gradients `gs` (canonical views of `projs`, edited in place into the tails);
        returns the shared parts' gradients, (P, ...) or per_expert (E, P, ...)."""
        cfg = self.cfg
        if cfg.gradient_split == "none":  # the control: the plain sum
            return core.shared_gradient(gs, self.form, None, reduce)
        if cfg.gradient_split == "fixed":
            u, u_f = layer.stacked("basis", projs), layer.stacked("basis_f", projs)
            if u_f is None:
                return core.split_gradient(gs, u, self.form, cfg.normalize_tail_updates, reduce)
            shared = core.shared_gradient(gs, self.form, u, reduce, u_f)
            core.split_tails(gs, u, cfg.normalize_tail_updates, u_f)
            return shared
        # per_step: the tracked basis, one buffer for the layer's projections (a copy if some lack gradients)
        whole = len(projs) == len(layer.projs)
        index = [layer.projs.index(p) for p in projs]
        q_PDX = layer.q_PDX if whole else layer.q_PDX[index]
        rr = cfg.tracker_oversample > 0
        if cfg.tracker_lag:
            # this step splits in the basis tracked through the last one; the split's own products make
            # this step's tracking step (`core.split_gradient`), written into q_PDX for the next
            exact_PDX = self._exact(li, projs, gs, q_PDX, reduce) if exact else None
            shared = core.split_gradient(gs, q_PDX[..., : layer.r], self.form, cfg.normalize_tail_updates, reduce,
                                         track_PDX=q_PDX, rayleigh_ritz=rr)
            if exact_PDX is not None:
                q_PDX.copy_(exact_PDX)
        else:
            q = core.track_basis(gs, q_PDX, cfg.tracker_iters, layer.r, rr, reduce)
            if exact:
                q_PDX.copy_(self._exact(li, projs, gs, q_PDX, reduce))  # this step splits in the exact basis
            if self.form == "full":
                shared = core.split_gradient(gs, q, self.form, cfg.normalize_tail_updates, reduce)
            else:  # per_expert keeps its shared gradient in U, the tails are cut in the tracked Q
                shared = core.shared_gradient(gs, self.form, layer.stacked("basis", projs), reduce)
                core.split_tails(gs, q, cfg.normalize_tail_updates)
        if not whole:
            layer.q_PDX[index] = q_PDX
        return shared

    def _exact(self, li: int, projs: tuple[str, ...], gs: list[torch.Tensor], q_PDX: torch.Tensor,
               reduce) -> torch.Tensor:
        """The exact top-X of this step's gradients (read before the split), recording the drift of the
        tracked basis in q_PDX, the one this step's split would otherwise use, from it (`exact_every`)."""
        r = self.layers[li].r
        out = torch.empty_like(q_PDX)
        for k, (p, g) in enumerate(zip(projs, gs)):
            m = gram(g)
            if reduce is not None:
                reduce(m)
            out[k] = data_subspace(m, q_PDX.shape[-1])[0].to(q_PDX.dtype)
            self._drift[f"{li}.{p}"] = core.drift(q_PDX[k, :, :r], out[k, :, :r])
        return out

    # -- event 3: after the optimizer step ------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, step: int, reference_batch=None) -> dict | None:
        """The shared part's optimizer step, folded into every expert; tails re-projected (fixed split,
        per-expert form); U re-estimated every `reestimate_every` steps (returns its record)."""
        if not self.split_done:
            return None
        if self.shared_optimizer is None:
            raise UserError("SDMoE.after_optimizer_step before an optimizer was bound; pass the optimizer to "
                            "before_forward() or call bind_optimizer(optimizer) after the split")
        opt, index = self._host
        group = opt.param_groups[index]
        lr_t = float(group["lr"])
        lr_s = lr_t / (group.get("lr_mult", 1.0) or 1.0) * self.cfg.lr_shared_mult  # base rate x shared mult
        wd = float(group.get("weight_decay", 0.0))
        self.shared_optimizer.param_groups[0]["lr"] = lr_s
        self.shared_optimizer.step()
        steps = [layer.delta[p].detach() for layer in self.layers for p in layer.projs]
        for layer in self.layers:
            views, commit = layer.block.views("data", layer.projs)
            for p, w in views.items():
                if wd and lr_t != lr_s:  # W_i decayed at the tails' rate; C decays at the shared part's
                    core.add_to_experts(w, layer.contribution(p), alpha=(lr_t - lr_s) * wd)
                core.fold_shared(w, layer.delta[p].detach(), layer.basis[p], self.form)
                if self._reproject:  # the tails re-projected against the updated C
                    layer.shared[p].mul_(1.0 - lr_s * wd).add_(layer.delta[p].detach())
                    core.project_tails(w, layer.contribution(p), layer.basis[p], layer.basis_f.get(p))
            commit()
        if not self._reproject:  # every shared part's update in two calls
            shared = [layer.shared[p] for layer in self.layers for p in layer.projs]
            if wd:
                torch._foreach_mul_(shared, 1.0 - lr_s * wd)
            torch._foreach_add_(shared, steps)
        torch._foreach_zero_(steps)
        self.shared_optimizer.zero_grad(set_to_none=True)
        if (r := self.cfg.refresh_every) and step >= self.cfg.split_step and (step - self.cfg.split_step + 1) % r == 0:
            self.refresh()
            self.refreshed_at.append(step)
        record = None
        k = self.cfg.reestimate_every
        if k and step >= self.cfg.split_step and (step - self.cfg.split_step + 1) % k == 0:
            record = self.reestimate(reference_batch)
        self._sync_hooks(step + 1)
        return record

    # -- the split and re-estimation ------------------------------------------------------------------
    def split(self, reference_batch=None) -> dict:
        """Split now: bases, shared parts, tails where the rule projects them. Returns
        {"form", "gradient_split", "layers": [{layer, rank, basis_source, rel_change}], ...}."""
        if self.split_done:
            raise UserError("this model is already split by this SDMoE; create a new SDMoE to split it again")
        if reference_batch is not None:
            self._collect_from(reference_batch)
        io = _BlockIO(self.model, self.blocks, reference_batch) if reference_batch is not None else None
        for li, (block, r) in enumerate(zip(self.blocks, self.ranks)):
            width = self._width(block, r)
            layer = _Layer(block, self.cfg, self.form, r, width)
            self.layers.append(layer)
            self._fill(li, layer, self._bases(li, layer, width))
            if layer.router_basis is not None:
                if not self.collector.has_inputs():
                    raise UserError("router_input='residual' needs the layer inputs: set split_step >= 1 so warm-up "
                                    "steps are observed, or pass reference_batch to split()")
                layer.router_basis.copy_(data_subspace(self.collector.input_moment(li), r)[0].float())
        self._attach_router_hooks()
        self.split_done = True
        SPLIT_BY[self.model] = self
        self.collector.stop()
        self.collector.reset()
        out = {"form": self.form, "gradient_split": self.cfg.gradient_split,
               "projection_sides": self.cfg.projection_sides,
               "layers": [{"layer": b.layer, "rank": r, "basis_source": self.cfg.basis_source}
                          for b, r in zip(self.blocks, self.ranks)]}
        if io is not None:
            io.record(out)
        return out

    @torch.no_grad()
    def _fill(self, li: int, layer: _Layer, bases: dict[str, torch.Tensor]) -> None:
        """U, Q and the shared parts from the current weights; tails projected out of U where the rule
        says (lowrank and per-expert forms, the fixed split): that drops each expert's own part inside
        U (the function changes, and the split record measures by how much), except per_expert (exact)."""
        views, commit = layer.block.views("data", layer.projs)
        project = self.form != "full" or self.cfg.gradient_split == "fixed"
        for p in layer.projs:
            u, _ = bases[p]
            self._set_bases(layer, p, bases[p])
            if p in layer.q:
                layer.q[p].copy_(u[:, : layer.q[p].shape[1]])
            layer.shared[p].copy_(core.shared_at_split(views[p], layer.basis[p], self.form))
            if project:
                core.project_tails(views[p], layer.contribution(p), layer.basis[p], layer.basis_f.get(p))
        commit()

    def _bases(self, li: int, layer: _Layer, width: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The bases the split (or a re-estimation) takes; from the shared weight it is about to set, the
        experts' mean, when basis_source='shared'."""
        shared = None
        if self.cfg.basis_source == "shared":
            views, _ = layer.block.views("data", layer.projs)
            shared = {p: core.shared_at_split(views[p], None, "full") for p in layer.projs}
        return choose_bases(layer.block, li, layer.projs, width, layer.r, self.cfg, self.collector, shared)

    @staticmethod
    def _set_bases(layer: _Layer, p: str, bases: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        u, u_f = bases
        layer.basis[p].copy_(u[:, : layer.r])
        if u_f is not None:
            layer.basis_f[p].copy_(u_f[:, : layer.r])

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the bases from their source (the shared weight S as trained so far, or the experts'
        weights) without changing any weight: the paper's refresh of P_U, P_V every 16 steps."""
        for li, layer in enumerate(self.layers):
            shared = layer.shared if self.cfg.basis_source == "shared" else None
            bases = choose_bases(layer.block, li, layer.projs, layer.r, layer.r, self.cfg, self.collector, shared)
            for p in layer.projs:
                self._set_bases(layer, p, bases[p])

    @torch.no_grad()
    def reestimate(self, reference_batch=None) -> dict:
        """Choose U again (basis_source) and split every layer again by the split's rule; logs the change."""
        if reference_batch is not None:
            self._collect_from(reference_batch)
        io = _BlockIO(self.model, self.blocks, reference_batch) if reference_batch is not None else None
        records = []
        for li, layer in enumerate(self.layers):
            width = self._width(layer.block, layer.r) if layer.q else layer.r
            bases = self._bases(li, layer, width)
            overlap = {p: float((layer.basis[p].T @ bases[p][0][:, : layer.r]).square().sum() / layer.r)
                       for p in layer.projs}
            self._fill(li, layer, bases)
            records.append({"layer": layer.block.layer, "rank": layer.r, "basis_source": self.cfg.basis_source,
                            "basis_overlap": overlap})
        self.collector.reset()
        out = {"layers": records}
        if io is not None:
            io.record(out)
        return out

    def _width(self, block: MoEBlock, r: int) -> int:
        """Columns tracked per basis: r plus the oversampling (Rayleigh-Ritz picks the best r), at most D."""
        return min(r + self.cfg.tracker_oversample, block.hidden_size)

    def _attach_router_hooks(self) -> None:
        for layer in self.layers:
            if layer.router_basis is not None:
                self._router_hooks.append(
                    layer.block.router.register_forward_pre_hook(ResidualRouterInput(layer.router_basis)))

    # -- the optimizer -----------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The shared deltas (zero between steps; their gradients are set by after_backward). Clip them
        with the model's parameters."""
        return [layer.delta[p] for layer in self.layers for p in layer.projs]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the model's gradients and the shared deltas' as one vector (after `after_backward`);
        returns the total norm, a 0-dim tensor (no host sync).

        The model's gradients may be FSDP2 DTensors and the deltas' are plain tensors (identical
        on every rank), which one `clip_grad_norm_` call cannot mix: the norms are taken apart."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        extra = [p.grad for p in self.parameters() if p.grad is not None]
        norms = [whole(torch.nn.utils.get_total_norm(grads))]
        if extra:
            norms.append(torch.nn.utils.get_total_norm(extra))
        norm = torch.linalg.vector_norm(torch.stack(norms))
        # torch's clip_grads_with_norm_ would multiply DTensors by a plain coefficient, which DTensor refuses:
        # the same coefficient, applied to the local shards (views of the DTensors' storage)
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([local(g) for g in grads + extra], coef)
        return norm

    def buffers(self) -> list[torch.Tensor]:
        """Every state tensor of the split (bases, tracked bases, shared parts, router bases), in a fixed order."""
        return [t for layer in self.layers for t in layer.tensors().values()]

    def num_shared_parameters(self) -> int:
        """Trainable numbers the shared parts add to the model's own (the method's extra parameters)."""
        return sum(t.numel() for t in self.parameters())

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, reset_state: bool = True) -> None:
        """Attach the host optimizer (once, after the split): reset the experts' optimizer state (fresh
        moments for the tails), move them into their own group when lr_tail_mult != 1, and build the
        shared optimizer (the host's class and settings, no weight decay: it is applied to C here).

        reset_state=False keeps the experts' moments: a resume whose host loads the optimizer's state
        before SD-MoE's (OLMo-core, torchtitan) binds an optimizer that already holds the tails' moments."""
        if not self.split_done:
            raise UserError("bind_optimizer() before the split; call split() first (or before_forward at split_step)")
        hosts = {id(p): p for layer in self.layers for p in layer.block.host_parameters(layer.projs)}
        index = next((i for i, g in enumerate(optimizer.param_groups) if any(id(p) in hosts for p in g["params"])), None)
        if index is None:
            raise UserError("the optimizer holds none of the experts' weights; build it from model.parameters()")
        if self._host is not None and self._host[0] is optimizer:
            return  # already bound
        group = optimizer.param_groups[index]
        for p in hosts.values() if reset_state else ():
            optimizer.state.pop(p, None)
        mult = self.cfg.lr_tail_mult
        if mult != 1.0 and group.get("name") != "sdmoe.tails":
            # Groups left empty stay (group indices and schedulers keep working); the new group follows
            # the base rate (the group's lr over its lr_mult) times the tails' multiplier.
            base_lr = group["lr"] / (group.get("lr_mult", 1.0) or 1.0)
            for g in optimizer.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in hosts]
            optimizer.add_param_group({"params": list(hosts.values()), "lr": base_lr * mult, "lr_mult": mult,
                                       "weight_decay": group.get("weight_decay", 0.0), "name": "sdmoe.tails"})
            index = len(optimizer.param_groups) - 1
        self._host = (optimizer, index)
        accepted = inspect.signature(type(optimizer)).parameters  # defaults may hold more (AdamW's decoupled flag)
        # the experts' group's settings over the defaults: optimizers built from group dicts (torchtitan's)
        # keep their betas and eps in the groups, the constructor's defaults being torch's
        settings = {**optimizer.defaults, **optimizer.param_groups[index]}
        settings = {k: v for k, v in settings.items() if k in accepted and k != "params"}
        if _fused_fits(settings, accepted, self.parameters()):
            # the deltas are a few dozen small tensors: one fused kernel steps them all (lab model: 0.1
            # instead of 0.7 ms a step); its rounding differs from the per-tensor loop's by about an ulp
            settings = {**settings, "fused": True, "foreach": None}
        self.shared_optimizer = type(optimizer)(self.parameters(), **{**settings, "weight_decay": 0.0})

    @torch.no_grad()
    def to(self, device: torch.device | str) -> "SDMoE":
        """Move the split's state to `device` (after `model.to(device)`): bases, shared parts, deltas, the
        shared optimizer's moments and the collected sums. Tensors are moved in place (`.data`), so the
        router hooks and the optimizers that hold them keep working."""
        device = torch.device(device)
        for layer in self.layers:
            for t in layer.owned():
                t.data = t.data.to(device)
        if self.shared_optimizer is not None:
            fused = any(g.get("fused") or g.get("capturable") for g in self.shared_optimizer.param_groups)
            for state in self.shared_optimizer.state.values():
                for key, value in state.items():
                    # the per-tensor AdamW keeps its step count on the CPU, the fused one beside the parameters
                    if torch.is_tensor(value) and (key != "step" or fused):
                        state[key] = value.to(device)
        self.collector.to(device)
        return self

    # -- monitoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def monitor(self, k: int = 8) -> dict:
        """Per layer/projection: mean off-diagonal overlap of the experts' (and tails') top-k subspaces."""
        layers = []
        for li, block in enumerate(self.blocks):
            with unsharded(self.model, block.name):  # all experts, also under FSDP2
                layers.append(self._monitor_layer(li, block, min(k, block.hidden_size)))
        return {"k": k, "random_baseline": k / self.blocks[0].hidden_size, "layers": layers}

    def _monitor_layer(self, li: int, block: MoEBlock, k: int) -> dict:
        views, _ = block.views("data")
        rec = {"layer": block.layer, "experts_overlap": {
            p: mean_off_diagonal(overlap_matrix(expert_subspaces(w.float(), k))) for p, w in views.items()}}
        if self.split_done:
            layer = self.layers[li]
            rec["tails_overlap"] = {
                p: mean_off_diagonal(overlap_matrix(expert_subspaces((views[p] - layer.contribution(p)).float(), k)))
                for p in layer.projs}
            drift = {key.split(".")[1]: float(v) for key, v in self._drift.items() if int(key.split(".")[0]) == li}
            if drift:
                rec["tracker_drift"] = drift
        return rec

    def tails(self, li: int) -> dict[str, torch.Tensor]:
        """Layer li's tails T_i = W_i - C_i (E x F x D copies), for tests and analyses."""
        layer = self.layers[li]
        views, _ = layer.block.views("data", layer.projs)
        return {p: views[p] - layer.contribution(p) for p in layer.projs}

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs, as tensors and plain values (`torch.save`, `weights_only=True` loads it)."""
        return {"version": STATE_VERSION, "split_done": self.split_done, "ranks": list(self.ranks),
                "config": dataclasses.asdict(self.cfg), "collector": self.collector.state_dict(),
                "drift": {k: float(v) for k, v in self._drift.items()},
                "layers": [layer.tensors() for layer in self.layers],
                "shared_optimizer": self.shared_optimizer.state_dict() if self.shared_optimizer else None}

    def load_state_dict(self, sd: Mapping, optimizer: torch.optim.Optimizer | None = None,
                        optimizer_loaded: bool = False) -> None:
        """Restore a `state_dict()` on a fresh model; after the split it rebuilds the split's state and
        binds `optimizer` (load the host optimizer's own state after this, or pass optimizer_loaded=True
        when it already holds its checkpointed state: the experts' moments are then kept)."""
        if sd.get("version") != STATE_VERSION:
            raise UserError(f"this SD-MoE state has version {sd.get('version')!r}, written by sdmoe 0.1's "
                            "parametrization engine; resume it with sdmoe 0.1.0 (pip install sdmoe==0.1.0), or "
                            "start the run again")
        if list(sd.get("ranks", self.ranks)) != list(self.ranks):
            raise UserError(f"checkpoint ranks {sd.get('ranks')} differ from this config's {self.ranks}; "
                            f"use the run's own sdmoe config")
        if self.split_done:
            raise UserError("load_state_dict() on an SDMoE that has already split; load into a fresh one")
        self.collector.load_state_dict(sd.get("collector", {}))
        self._drift = {k: torch.tensor(float(v)) for k, v in sd.get("drift", {}).items()}
        if not sd.get("split_done"):
            return
        self.collector.stop()
        for block, r, tensors in zip(self.blocks, self.ranks, sd["layers"]):
            layer = _Layer(block, self.cfg, self.form, r, self._width(block, r))
            for name, t in layer.tensors().items():
                t.copy_(tensors[name])
            self.layers.append(layer)
        self._attach_router_hooks()
        self.split_done = True
        SPLIT_BY[self.model] = self
        if optimizer is not None:
            self.bind_optimizer(optimizer, reset_state=not optimizer_loaded)
            if sd.get("shared_optimizer") is not None:
                self.shared_optimizer.load_state_dict(sd["shared_optimizer"])

    # -- export ------------------------------------------------------------------------------------------
    def export(self, target: nn.Module | None = None) -> nn.Module:
        """A plain model for saving: the residual router's projection folded into `target`'s routers
        (default: this model; an unsharded copy of it under FSDP2), every sdmoe hook removed."""
        target = self.model if target is None else target
        if target is not self.model and any(layer.router_basis is not None for layer in self.layers):
            for layer, block in zip(self.layers, find_moe_blocks(target)):
                fold(block.router, layer.router_basis)
        return export(target)

    # -- collection windows (gradient / activation bases) ----------------------------------------------
    def _in_window(self, step: int) -> bool:
        c = self.cfg
        if not (self.collector.need_grads or self.collector.need_inputs):
            return False
        if not self.split_done:
            return c.split_step - c.basis_batches <= step < c.split_step
        if not c.reestimate_every or c.basis_source == "weights":
            return False  # after the split only U is re-estimated; the router basis stays
        j = (step - c.split_step) % c.reestimate_every
        return step >= c.split_step and j >= c.reestimate_every - c.basis_batches

    def _sync_hooks(self, next_step: int) -> None:
        if self._in_window(next_step):
            self.collector.start(inputs=not self.split_done or self.cfg.basis_source == "activations")
        else:
            self.collector.stop()

    def _collect_from(self, batch) -> None:
        """Fill the collector from a reference batch when the warm-up left it empty."""
        c = self.collector
        if c.need_inputs and not c.has_inputs():
            c.start(always=True)
            try:
                with torch.no_grad():
                    _forward(self.model, batch)
            finally:
                c.stop()
        if c.need_grads and not c.has_grads():
            params = [t for b in self.blocks for t in b.host_parameters()]
            saved = [p.grad for p in params]
            logits = _forward(self.model, batch)
            ids = _input_ids(batch)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = torch.zeros_like(p) if g is None else g
            c.add_grads()
            for p, g in zip(params, saved):
                p.grad = g


# -- helpers ----------------------------------------------------------------------------
def _fused_fits(settings: dict, accepted: Mapping, params: list[torch.Tensor]) -> bool:
    """Whether the shared optimizer may use its class's fused kernel: the class has one, the host chose no
    implementation (fused, foreach or differentiable), and the deltas are float tensors on the CPU or CUDA."""
    if "fused" not in accepted or settings.get("fused") is not None or settings.get("foreach") is not None:
        return False
    if settings.get("differentiable") or settings.get("capturable"):
        return False
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16,
                                                                 torch.float64) for p in params)


def _input_ids(batch) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, Mapping) else batch


def _forward(model: nn.Module, batch) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        return logits(model, batch)
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


class _BlockIO:
    """Each MoE block's inputs and outputs on a reference batch, to measure a conversion's change."""

    def __init__(self, model: nn.Module, blocks, batch):
        self.model, self.blocks, self.batch = model, blocks, batch
        self.inputs, self.outputs = {}, {}
        handles = []
        for i, b in enumerate(blocks):
            handles.append(b.module.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            handles.append(b.module.register_forward_hook(self._post(i)))
        try:
            with torch.no_grad():
                self.logits = _forward(model, batch).detach().clone()
        finally:
            for h in handles:
                h.remove()

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (args, kwargs)
        return hook

    def _post(self, i):
        def hook(module, args, out):
            self.outputs[i] = _first(out).detach().clone()
        return hook

    @torch.no_grad()
    def record(self, out: dict) -> None:
        """Write each layer's output change (and the logits') into a split/re-estimation record."""
        changes, logits_change = self.changes()
        for rec, c in zip(out["layers"], changes):
            rec["rel_change"] = c
        out["logits_rel_change"] = logits_change

    def changes(self) -> tuple[list[float], float]:
        rel = []
        for i, b in enumerate(self.blocks):
            args, kwargs = self.inputs[i]
            new = _first(b.module(*args, **kwargs))
            rel.append(_rel(new, self.outputs[i]))
        return rel, _rel(_forward(self.model, self.batch), self.logits)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
