"""`SDMoE`: SD-MoE as a transform of gradients and an optimizer-side shared update.

The host model stays a plain transformers model at every step: its expert weights
W_i are its own parameters, trained by its own optimizer. What SD-MoE adds lives
outside the model, in parts with one job each:

    split.split_rule            the gradient split's rule, read once from the config (PerStepSplit,
                                FixedSplit, TwoSidedSplit, NoSplit): what the parts below ask
    layer.LayerState            a layer's rule, bases, tracked bases, shared parts and deltas
    split.split_layer           the gradient split of one layer (after the backward), by its rule
    shared_optimizer            the shared parts' optimizer, its rate, its fold into the experts
    schedule                    when: the split, collection windows, refreshes, re-estimations
    basis.choose_bases          where U comes from (weights, gradients, activations, the shared weight)
    probe.ChangeProbe           how much a split or re-estimation changed the function

`SDMoE` is the facade over them. Most callers never touch it: `sdmoe.attach(model, optimizer,
cfg)` (`driver.py`) drives it from hooks on the optimizer and the model. The three events below
are the low-level API, for loops that want to call them by hand:

    ctl = SDMoE(model, cfg)
    for step in range(steps):
        ctl.before_forward(step, optimizer, reference_batch)  # split when due; collection windows
        loss = ...; loss.backward()
        ctl.after_backward(step)           # split the gradients; BEFORE clipping
        ctl.clip_grad_norm_(max_norm)      # the model's gradients and the shared ones, as one vector
        optimizer.step()
        ctl.after_optimizer_step(step)     # shared update folded in; re-projection; re-estimation
        optimizer.zero_grad()

Resume: save `state_dict()` (tensors: torch.save-able with weights_only=True); on a
fresh model, `load_state_dict(sd, optimizer)` rebuilds the split, binds the optimizer
and restores the shared optimizer's state; then load the host optimizer's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe import MoEBlock, find_moe_blocks
from sdmoe.moe.sharding import clip_, total_norm, unsharded
from sdmoe.spectral import mean_expert_overlap

from . import core, schedule, sharding
from .basis import Collector, choose_bases
from .config import SDMoEConfig
from .hooks import SplitMark, split_by, uncompiled
from .layer import LayerState
from .probe import ChangeProbe
from .shared_optimizer import SharedOptimizer
from .split import split_layer, split_rule

STATE_VERSION = 2  # 1: the parametrization engine of sdmoe 0.1 (not readable here)


class SDMoE:
    """SD-MoE on a transformers MoE model: the gradient split and the shared update, driven by three events."""

    def __init__(self, model: nn.Module, cfg: SDMoEConfig):
        if not isinstance(cfg, SDMoEConfig):
            raise UserError(f"cfg must be an SDMoEConfig, got {type(cfg).__name__}")
        cfg.validate()
        model = uncompiled(model)  # a torch.compile wrapper: the module under it (its blocks' names, no _orig_mod.)
        if split_by(model) is not None:
            raise UserError("this model is already split by another SDMoE; use that one, or export(model) first to "
                            "split it again")
        self.model, self.cfg = model, cfg
        self.rule = split_rule(cfg)  # the config's strings read once: the parts below ask the rule
        self.form = self.rule.form
        self.blocks = find_moe_blocks(model)
        self.ranks = cfg.resolve_ranks(self.blocks[0].hidden_size, len(self.blocks))
        f = self.blocks[0].expert_ffn
        if self.rule.two_sided and max(self.ranks) >= f:
            raise UserError(f"a two-sided split of rank {max(self.ranks)} needs a larger expert ffn width than "
                            f"F={f}; lower sdmoe.rank below {f}")
        self.refreshed_at: list[int] = []  # steps after which the bases were refreshed (refresh_every)
        self.split_done = False
        self.last_split: dict | None = None  # the split's record
        self.layers: list[LayerState] = []
        self.shared: SharedOptimizer | None = None
        self._drift: dict[str, torch.Tensor] = {}
        self._from_shared = cfg.basis_source == "shared"  # U from the shared weight S (the paper's), not the experts
        self.collector = Collector(self.blocks, cfg.basis_source)
        self.collector.sync(cfg, 0, False)

    @property
    def shared_optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer over the shared deltas (None until an optimizer is bound)."""
        return None if self.shared is None else self.shared.optimizer

    # -- event 1: before the forward ------------------------------------------------------------
    def before_forward(self, step: int, optimizer: torch.optim.Optimizer | None = None,
                       reference_batch=None) -> dict | None:
        """At step >= split_step: split (and bind `optimizer`); returns the split record. Before it:
        open or close the collection windows the basis source needs."""
        if self.split_done:
            return None
        if not schedule.split_due(self.cfg, step):
            self.collector.sync(self.cfg, step, False)
            return None
        record = self.split(reference_batch)
        if optimizer is not None:
            self.bind_optimizer(optimizer)
        return record

    # -- event 2: after the backward, before clipping ---------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Before the split: accumulate what the basis source needs. After it: split every expert's
        gradient into its tail (in place) and hand the shared part's gradient to its delta (`split_layer`).
        No host syncs."""
        collect = self.collector.need_grads and self.collector.in_window(self.cfg, step, self.split_done)
        if not self.split_done:
            if collect:
                self.collector.add_grads()
            self.collector.sync(self.cfg, step + 1, self.split_done)
            return
        exact = schedule.exact_due(self.cfg, step)
        for li, layer in enumerate(self.layers):
            observe = (lambda p, g, li=li: self.collector.add_gram(li, p, g)) if collect else None
            split_layer(layer, exact=exact, drift=self._drift, key=str(li), observe=observe)
        if collect:
            self.collector.grad_batches += 1

    # -- event 3: after the optimizer step ------------------------------------------------------------
    @torch.no_grad()
    def after_optimizer_step(self, step: int, reference_batch=None) -> dict | None:
        """The shared part's optimizer step, folded into every expert; tails re-projected where the rule keeps
        them out of U; U refreshed or re-estimated when due (returns the re-estimation's record)."""
        if not self.split_done:
            return None
        if self.shared is None:
            raise UserError("SDMoE.after_optimizer_step before an optimizer was bound; pass the optimizer to "
                            "before_forward() or call bind_optimizer(optimizer) after the split")
        self.shared.step()
        if schedule.refresh_due(self.cfg, step):
            self.refresh()
            self.refreshed_at.append(step)
        record = self.reestimate(reference_batch) if schedule.reestimate_due(self.cfg, step) else None
        self.collector.sync(self.cfg, step + 1, True)
        return record

    # -- the split and re-estimation ------------------------------------------------------------------
    def split(self, reference_batch=None) -> dict:
        """Split now: bases, shared parts, tails where the rule projects them. Returns (and keeps as
        `last_split`) {"form", "gradient_split", "layers": [{layer, rank, basis_source, rel_change}], ...}."""
        if self.split_done:
            raise UserError("this model is already split by this SDMoE; create a new SDMoE to split it again")
        if reference_batch is not None:
            self.collector.fill_from(self.model, reference_batch)
        probe = ChangeProbe(self.model, self.blocks, reference_batch) if reference_batch is not None else None
        data_basis = self.collector.need_grads or self.collector.need_inputs
        for block in self.blocks:
            sharding.check_split(block, self.form, self.cfg.basis_source if data_basis else None)
        for li, (block, r) in enumerate(zip(self.blocks, self.ranks)):
            width = self.rule.width(r, block.hidden_size)
            layer = LayerState(block, self.rule, self.cfg.projections, r, width)
            self.layers.append(layer)
            self._fill(layer, self._bases(li, layer, width))
        self._mark_split()
        self.collector.stop()
        self.collector.reset()
        out = {"form": self.form, "gradient_split": self.cfg.gradient_split,
               "projection_sides": self.cfg.projection_sides,
               "layers": [{"layer": b.layer, "rank": r, "basis_source": self.cfg.basis_source}
                          for b, r in zip(self.blocks, self.ranks)]}
        if probe is not None:
            probe.record(out)
        self.last_split = out
        return out

    def _mark_split(self) -> None:
        self.split_done = True
        self.model.register_forward_pre_hook(SplitMark(self))  # how a second SDMoE finds this one (`split_by`)

    @torch.no_grad()
    def _fill(self, layer: LayerState, bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """U, Q and the shared parts from the current weights; tails projected out of U where the rule says
        (`projects_at_split`): that drops each expert's own part inside U (the function changes, and the
        split record measures by how much), except per_expert (exact)."""
        views, commit = layer.block.views("data", layer.projs)
        reduce = _reducer(layer.block)
        for p in layer.projs:
            u, _ = bases[p]
            layer.set_bases(p, bases[p])
            if p in layer.q:
                layer.q[p].copy_(u[:, : layer.q[p].shape[1]])
            layer.shared[p].copy_(core.shared_at_split(views[p], layer.basis[p], self.form, reduce,
                                                       layer.block.num_experts))
            if layer.rule.projects_at_split:
                core.project_tails(views[p], layer.contribution(p), layer.basis[p], layer.basis_f.get(p))
        commit()

    def _bases(self, li: int, layer: LayerState, width: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The bases the split (or a re-estimation) takes; from the shared weight it is about to set, the
        experts' mean, when basis_source='shared'."""
        shared, reduce = None, _reducer(layer.block)
        if self._from_shared:
            views, _ = layer.block.views("data", layer.projs)
            shared = {p: core.shared_at_split(views[p], None, "full", reduce, layer.block.num_experts)
                      for p in layer.projs}
        return choose_bases(layer.block, li, layer.projs, width, layer.r, self.cfg, self.collector, shared, reduce,
                            layer.rule.two_sided)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the bases from their source (the shared weight S as trained so far, or the experts'
        weights) without changing any weight: the paper's refresh of P_U, P_V every 16 steps."""
        for li, layer in enumerate(self.layers):
            shared = layer.shared if self._from_shared else None
            bases = choose_bases(layer.block, li, layer.projs, layer.r, layer.r, self.cfg, self.collector, shared,
                                 _reducer(layer.block), layer.rule.two_sided)
            for p in layer.projs:
                layer.set_bases(p, bases[p])

    @torch.no_grad()
    def reestimate(self, reference_batch=None) -> dict:
        """Choose U again (basis_source) and split every layer again by the split's rule; logs the change."""
        if reference_batch is not None:
            self.collector.fill_from(self.model, reference_batch)
        probe = ChangeProbe(self.model, self.blocks, reference_batch) if reference_batch is not None else None
        records = []
        for li, layer in enumerate(self.layers):
            bases = self._bases(li, layer, self.rule.width(layer.r, layer.block.hidden_size))
            overlap = {p: float((layer.basis[p].T @ bases[p][0][:, : layer.r]).square().sum() / layer.r)
                       for p in layer.projs}
            self._fill(layer, bases)
            records.append({"layer": layer.block.layer, "rank": layer.r, "basis_source": self.cfg.basis_source,
                            "basis_overlap": overlap})
        self.collector.reset()
        out = {"layers": records}
        if probe is not None:
            probe.record(out)
        return out

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
        norms = [total_norm(grads)]
        if extra:
            norms.append(torch.nn.utils.get_total_norm(extra))
        norm = torch.linalg.vector_norm(torch.stack(norms))
        clip_(grads + extra, max_norm, norm)
        return norm

    def buffers(self) -> list[torch.Tensor]:
        """Every state tensor of the split (bases, tracked bases, shared parts), in a fixed order."""
        return [t for layer in self.layers for t in layer.tensors().values()]

    def num_shared_parameters(self) -> int:
        """Trainable numbers the shared parts add to the model's own (the method's extra parameters)."""
        return sum(t.numel() for t in self.parameters())

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, reset_state: bool = True) -> None:
        """Attach the host optimizer (once, after the split): see `SharedOptimizer` (the experts' state reset
        unless reset_state=False, the shared optimizer built)."""
        if not self.split_done:
            raise UserError("bind_optimizer() before the split; call split() first (or before_forward at split_step)")
        if self.shared is not None and self.shared.host is optimizer:
            return  # already bound
        self.shared = SharedOptimizer(optimizer, self.layers, self.cfg.lr_shared_mult, reset_state)

    @torch.no_grad()
    def to(self, device: torch.device | str) -> "SDMoE":
        """Move the split's state to `device` (after `model.to(device)`): bases, shared parts, deltas, the
        shared optimizer's moments and the collected sums. Tensors are moved in place (`.data`), so the
        optimizers that hold them keep working."""
        device = torch.device(device)
        for layer in self.layers:
            for t in layer.owned():
                t.data = t.data.to(device)
        if self.shared is not None:
            self.shared.to(device)
        self.collector.to(device)
        return self

    # -- monitoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def monitor(self, k: int = 8) -> dict:
        """Per layer/projection: mean off-diagonal overlap of the experts' (and tails') top-k subspaces."""
        layers = []
        for li, block in enumerate(self.blocks):
            with unsharded(self.model, block.name):  # all experts, also under FSDP2
                tails = self.tails(li) if self.split_done else None
                drift = {key.split(".")[1]: float(v) for key, v in self._drift.items() if int(key.split(".")[0]) == li}
                layers.append(_monitor_layer(block, tails, drift, min(k, block.hidden_size)))
        return {"k": k, "random_baseline": k / self.blocks[0].hidden_size, "layers": layers}

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
        for block, r, tensors in zip(self.blocks, self.ranks, sd["layers"]):
            layer = LayerState(block, self.rule, self.cfg.projections, r, self.rule.width(r, block.hidden_size))
            for name, t in layer.tensors().items():
                t.copy_(tensors[name])
            self.layers.append(layer)
        self._mark_split()
        if optimizer is not None:
            self.bind_optimizer(optimizer, reset_state=not optimizer_loaded)
            if sd.get("shared_optimizer") is not None:
                self.shared_optimizer.load_state_dict(sd["shared_optimizer"])


def _monitor_layer(block: MoEBlock, tails: dict[str, torch.Tensor] | None, drift: dict[str, float], k: int) -> dict:
    """One layer's monitor record: the experts' (and, after the split, the tails') mean top-k overlap."""
    views, _ = block.views("data")
    rec = {"layer": block.layer, "experts_overlap": {p: mean_expert_overlap(w.float(), k) for p, w in views.items()}}
    if tails is not None:
        rec["tails_overlap"] = {p: mean_expert_overlap(t.float(), k) for p, t in tails.items()}
        if drift:
            rec["tracker_drift"] = drift
    return rec


def _reducer(block: MoEBlock):
    """The sum over the ranks holding `block`'s other experts (None when this rank holds them all)."""
    return sharding.reducer(block.host_parameters()[0])


def convert(model: nn.Module, cfg: SDMoEConfig | None = None, reference_batch=None) -> SDMoE:
    """Split `model` in place now (cfg.split_step is not waited for; default: the per-expert form, exact and
    function-preserving; the shared forms measure their change on `reference_batch`). Returns its controller,
    whose `last_split` is the split's record; bind an optimizer with `bind_optimizer` to train it, and
    `sdmoe.export(model)` makes it a plain model again."""
    ctl = SDMoE(model, cfg or SDMoEConfig(form="per_expert"))
    ctl.split(reference_batch)
    return ctl
