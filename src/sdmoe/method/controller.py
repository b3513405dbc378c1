"""`SDMoE`: the object a training loop drives.

    ctl = SDMoE(model, cfg)
    for step in range(steps):
        ctl.maybe_split(step, optimizer, reference_batch)   # before the forward
        loss = ...; loss.backward()
        ctl.after_backward(step) if ctl.split_done else ctl.observe(step)
        clip; optimizer.step()
        ctl.after_optimizer_step(step, reference_batch)     # re-projection, re-estimation
        optimizer.zero_grad()

Resume: `prepare_for_load()` rebuilds the split structure on a fresh model
(placeholder values), `rebind_optimizer(opt)`, then load the model's,
optimizer's and this object's state dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.sharding import unsharded
from sdmoe.spectral import (
    data_subspace,
    expert_subspaces,
    mean_off_diagonal,
    overlap_matrix,
)

from . import kernels, sharding
from .basis import Collector, canonical, choose_bases, gram
from .config import SDMoEConfig
from .parametrization import STATE_NAME, SDMoEState, install
from .router import ResidualRouterInput


class SDMoE:
    """Splits a transformers MoE model's experts into shared parts and tails, and drives the gradient split."""

    def __init__(self, model: nn.Module, cfg: SDMoEConfig):
        if not isinstance(cfg, SDMoEConfig):
            raise UserError(f"cfg must be an SDMoEConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.model, self.cfg = model, cfg
        self.blocks = find_moe_blocks(model)
        if any(isinstance(getattr(b.module, STATE_NAME, None), SDMoEState) for b in self.blocks):
            raise UserError("this model is already split by SD-MoE; use its controller, or export(model) "
                            "first to split it again")
        self.ranks = cfg.resolve_ranks(self.blocks[0].hidden_size, len(self.blocks))
        self.split_done = False
        self.states: list[SDMoEState] = []
        self._replaced: list[nn.Parameter] = []
        self._drift: dict[str, torch.Tensor] = {}
        need_grads = cfg.basis_source == "gradients"
        need_inputs = cfg.basis_source == "activations" or cfg.router_input == "residual"
        self.collector = Collector(self.blocks, need_grads, need_inputs)
        self._reproject = cfg.gradient_split == "fixed" or (cfg.mode == "per_expert" and cfg.gradient_split != "none")
        self._sync_hooks(0)

    # -- collection windows ----------------------------------------------------
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

    def observe(self, step: int) -> None:
        """After backward on a step before the split: accumulate what the basis source needs."""
        if self.split_done:
            return
        if self._in_window(step):
            self.collector.add_grads()
        self._sync_hooks(step + 1)

    # -- the split ---------------------------------------------------------------
    def maybe_split(self, step: int, optimizer: torch.optim.Optimizer | None = None, reference_batch=None) -> dict | None:
        """At step >= split_step (before its forward): split, then rebind `optimizer`; returns the split record."""
        if self.split_done:
            return None
        if step < self.cfg.split_step:
            self._sync_hooks(step)
            return None
        record = self.split(reference_batch)
        if optimizer is not None:
            self.rebind_optimizer(optimizer)
        return record

    def split(self, reference_batch=None) -> dict:
        """Convert in place now. Returns {"layers": [{layer, rank, basis_source, rel_change}], ...}."""
        if self.split_done:
            raise UserError("this model is already split; export(model) first to split it again")
        if reference_batch is not None:
            self._collect_from(reference_batch)
        io = _BlockIO(self.model, self.blocks, reference_batch) if reference_batch is not None else None
        width_extra = self.cfg.tracker_oversample
        for li, (block, r) in enumerate(zip(self.blocks, self.ranks)):
            state = SDMoEState(block, self.cfg, r)
            width = min(r + width_extra, block.hidden_size)
            bases = choose_bases(block, li, state.projs, width, self.cfg.basis_source, self.collector)
            w = canonical(block, "data")
            self._fill(state, {p: w[p] for p in state.projs}, bases)
            self._replaced += install(block, state)
            self._after_install(block, state)
            self.states.append(state)
        self.split_done = True
        self.collector.stop()
        self.collector.reset()
        layers = [{"layer": b.layer, "rank": r, "basis_source": self.cfg.basis_source}
                  for b, r in zip(self.blocks, self.ranks)]
        out = {"mode": self.cfg.mode, "shared_form": self.cfg.shared_form,
               "gradient_split": self.cfg.gradient_split, "layers": layers}
        if io is not None:
            io.record(out)
        return out

    @torch.no_grad()
    def _fill(self, state: SDMoEState, w: dict[str, torch.Tensor], bases: dict[str, torch.Tensor]) -> None:
        """Set bases, tracker state and shared coefficients from canonical weights (E x F x D)."""
        r = state.r
        for p in state.projs:
            u = bases[p].to(state.basis(p).device)
            state.basis(p).copy_(u[:, :r])
            if state.q(p) is not None:
                state.q(p).copy_(u[:, : state.q(p).shape[1]])
            wp = w[p].to(state.coef(p).dtype)
            ud = u[:, :r].to(wp.dtype)
            if state.form == "full":
                state.coef(p).copy_(wp.mean(0))
            elif state.form == "lowrank":
                state.coef(p).copy_(wp.mean(0) @ ud)
            else:
                state.coef(p).copy_(wp @ ud)
        if self.cfg.router_input == "residual" and not self.split_done:  # chosen once, at the split
            li = len(self.states)
            if self.collector.has_inputs():
                state.router_basis.copy_(data_subspace(self.collector.input_moment(li), r)[0].float())
            else:
                raise UserError("router_input='residual' needs the layer inputs: set split_step >= 1 so warm-up "
                                "steps are observed, or pass reference_batch to split()")

    @torch.no_grad()
    def _after_install(self, block, state: SDMoEState, hooks: bool = True) -> None:
        """Tails have W - shared (exact); drop their part inside U where the rule says so."""
        if state.form == "lowrank" or (state.form == "full" and self.cfg.gradient_split == "fixed") or \
                state.form == "per_expert":
            self._project_tails(state)
        if hooks and self.cfg.router_input == "residual":
            block.router.register_forward_pre_hook(ResidualRouterInput(state))

    @torch.no_grad()
    def _project_tails(self, state: SDMoEState) -> None:
        views, commit = state.tail_views("data")
        for p, t in views.items():
            kernels.project_out(t, state.basis(p))
        commit()

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
            params = [t for b in self.blocks for t in _host_tensors(b)]
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

    # -- the per-step gradient split ---------------------------------------------------
    def after_backward(self, step: int) -> None:
        """Split this step's gradients (per_step / fixed); nothing for the control ("none"). No host syncs.

        Works on FSDP2-sharded parameters too (`sharding`): tails on their local experts,
        the tracker's M Q all-reduced before its QR, shared parts gathered whole."""
        if not self.split_done:
            return
        cfg = self.cfg
        collect = self._in_window(step) and self.collector.need_grads
        split = cfg.gradient_split != "none"
        rr = cfg.tracker_oversample > 0
        exact = cfg.gradient_split == "per_step" and cfg.exact_every and step % cfg.exact_every == 0
        for li, state in enumerate(self.states):
            half = state.undecomposed_half()
            if half is None and not split and not collect:
                continue
            full = state.form == "full" and (split or half is not None)
            shared, commit_shared = state.shared_grads() if full else ({}, lambda: None)
            if half is not None and (g := state.shared_grad_view(shared, half)) is not None:
                g.zero_()  # that half is not decomposed: its tails carry the whole weight
            views, commit = state.tail_views("grad")
            if collect:
                for p, g in views.items():
                    key = (li, p)
                    self.collector.grads[key] = self.collector.grads.get(key, 0) + gram(g)
            if split:
                self._split_grads(li, state, views, shared, exact, rr)
            commit()
            commit_shared()
        if collect:
            self.collector.grad_batches += 1

    def _split_grads(self, li: int, state: SDMoEState, views: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], exact: bool, rr: bool) -> None:
        """One layer: track Q (per_step), project the tails' gradients out of it, keep the shared one inside."""
        cfg = self.cfg
        reduce = sharding.reducer(state.tail_parameters()[0])  # sum over experts on every rank (FSDP2)
        for projs, g in _groups(state, views):
            if cfg.gradient_split == "per_step":
                qbuf = torch.stack([state.q(p) for p in projs])  # P x D x X
                q = kernels.track(g, qbuf, cfg.tracker_iters, state.r, rr, reduce)
                if exact:
                    for k, p in enumerate(projs):
                        m = gram(g[:, k])
                        if reduce is not None:
                            reduce(m)
                        e = data_subspace(m, qbuf.shape[-1])[0].to(qbuf.dtype)
                        self._drift[f"{li}.{p}"] = kernels.drift(q[k], e[:, : state.r])
                        qbuf[k].copy_(e)
                for k, p in enumerate(projs):
                    state.q(p).copy_(qbuf[k])
            else:
                q = torch.stack([state.basis(p) for p in projs])
            kernels.project_out(g, q, cfg.normalize_tail_updates)
            if state.form == "full":
                sg = [state.shared_grad_view(shared, p) for p in projs]
                if all(t is not None for t in sg):
                    kernels.keep_inside(_stack_views(sg, state, projs, shared), q)

    def after_optimizer_step(self, step: int, reference_batch=None) -> dict | None:
        """Re-project tails (fixed split, per_expert mode); re-estimate U every K steps (returns its record)."""
        if not self.split_done:
            return None
        if self._reproject:
            for state in self.states:
                self._project_tails(state)
        record = None
        k = self.cfg.reestimate_every
        if k and step >= self.cfg.split_step and (step - self.cfg.split_step + 1) % k == 0:
            record = self.reestimate(reference_batch)
        self._sync_hooks(step + 1)
        return record

    @torch.no_grad()
    def reestimate(self, reference_batch=None) -> dict:
        """Choose U again (basis_source) and re-split every layer by the split's rule; logs the change."""
        if reference_batch is not None:
            self._collect_from(reference_batch)
        io = _BlockIO(self.model, self.blocks, reference_batch) if reference_batch is not None else None
        layers = []
        for li, (block, state) in enumerate(zip(self.blocks, self.states)):
            width = state.q(state.projs[0]).shape[1] if state.q(state.projs[0]) is not None else state.r
            bases = choose_bases(block, li, state.projs, width, self.cfg.basis_source, self.collector)
            w = {p: t.clone() for p, t in canonical(block, "data").items() if p in state.projs}
            overlap = {p: float((state.basis(p).T @ bases[p][:, : state.r]).square().sum() / state.r)
                       for p in state.projs}
            self._fill(state, w, bases)
            _rewrite_tails(block, state, w)
            self._after_install(block, state, hooks=False)
            layers.append({"layer": block.layer, "rank": state.r, "basis_source": self.cfg.basis_source,
                           "basis_overlap": overlap})
        self.collector.reset()
        out = {"layers": layers}
        if io is not None:
            io.record(out)
        return out

    # -- optimizer -----------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The new parameters as two groups (shared/inner and tails), lr multipliers applied."""
        shared = [p for s in self.states for p in s.shared_parameters()]
        tails = [p for s in self.states for p in s.tail_parameters()]
        c = self.cfg
        name = "sdmoe.inner" if c.mode == "per_expert" else "sdmoe.shared"
        return [
            {"params": shared, "lr": lr * c.lr_shared_mult, "weight_decay": weight_decay, "name": name,
             "lr_mult": c.lr_shared_mult},
            {"params": tails, "lr": lr * c.lr_tail_mult, "weight_decay": weight_decay, "name": "sdmoe.tails",
             "lr_mult": c.lr_tail_mult},
        ]

    def rebind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the replaced expert Parameters (and their state) from `optimizer`; add param_groups().

        Groups left empty stay (so group indices and schedulers keep working). The new
        groups take the base lr (group lr / its lr_mult) and weight decay of the group
        that held the expert weights.
        """
        if not self.split_done:
            raise UserError("rebind_optimizer() before the split; call split() or prepare_for_load() first")
        new_ids = {id(p) for g in self.param_groups(0.0, 0.0) for p in g["params"]}
        if any(id(p) in new_ids for g in optimizer.param_groups for p in g["params"]):
            return  # already bound
        gone = {id(p) for p in self._replaced}
        base_lr, wd = optimizer.defaults.get("lr", 1e-3), optimizer.defaults.get("weight_decay", 0.0)
        found = False
        for group in optimizer.param_groups:
            keep = [p for p in group["params"] if id(p) not in gone]
            if len(keep) != len(group["params"]):
                if not found:
                    base_lr = group["lr"] / (group.get("lr_mult", 1.0) or 1.0)
                    wd, found = group.get("weight_decay", wd), True
                for p in group["params"]:
                    if id(p) in gone:
                        optimizer.state.pop(p, None)
                group["params"] = keep
        if isinstance(base_lr, torch.Tensor):
            base_lr = float(base_lr)
        for g in self.param_groups(base_lr, wd):
            optimizer.add_param_group(g)

    def other_parameters(self) -> list[nn.Parameter]:
        """The model's parameters that SD-MoE does not manage, in model order."""
        mine = {id(p) for g in self.param_groups(0.0, 0.0) for p in g["params"]}
        return [p for p in self.model.parameters() if id(p) not in mine]

    # -- monitoring ---------------------------------------------------------------
    @torch.no_grad()
    def monitor(self, k: int = 8) -> dict:
        """Per layer/projection: mean off-diagonal overlap of the experts' (and tails') top-k subspaces."""
        layers = []
        for li, block in enumerate(self.blocks):
            with unsharded(self.model, block.name):  # all experts, also under FSDP2
                layers.append(self._monitor_layer(li, block, min(k, block.hidden_size)))
        return {"k": k, "random_baseline": k / self.blocks[0].hidden_size, "layers": layers}

    def _monitor_layer(self, li: int, block, k: int) -> dict:
        rec = {"layer": block.layer, "experts_overlap": {}}
        for p, w in canonical(block, "data").items():
            rec["experts_overlap"][p] = mean_off_diagonal(overlap_matrix(expert_subspaces(w.float(), k)))
        if self.split_done:
            views, _ = self.states[li].tail_views("data")
            rec["tails_overlap"] = {p: mean_off_diagonal(overlap_matrix(expert_subspaces(t.float(), k)))
                                    for p, t in views.items()}
            drift = {p: float(v) for key, v in self._drift.items()
                     for (l_, p) in [key.split(".")] if int(l_) == li}
            if drift:
                rec["tracker_drift"] = drift
        return rec

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable: split flag, ranks, config, collector sums (only inside a collection window)."""
        return {"version": 1, "split_done": self.split_done, "ranks": list(self.ranks),
                "config": dataclasses.asdict(self.cfg), "collector": self.collector.state_dict(),
                "drift": {k: float(v) for k, v in self._drift.items()}}

    def load_state_dict(self, sd: Mapping) -> None:
        if bool(sd.get("split_done")) != self.split_done:
            raise UserError("the checkpoint's SD-MoE split state does not match this model; call "
                            "prepare_for_load() before loading a checkpoint taken after the split")
        if list(sd.get("ranks", self.ranks)) != list(self.ranks):
            raise UserError(f"checkpoint ranks {sd.get('ranks')} differ from this config's {self.ranks}; "
                            f"use the run's own sdmoe config")
        self.collector.load_state_dict(sd.get("collector", {}))
        self._drift = {k: torch.tensor(float(v)) for k, v in sd.get("drift", {}).items()}

    def prepare_for_load(self) -> None:
        """Build the split structure with placeholder values, ready for model.load_state_dict(checkpoint)."""
        if self.split_done:
            return
        self.collector.stop()
        for block, r in zip(self.blocks, self.ranks):
            state = SDMoEState(block, self.cfg, r)
            self._replaced += install(block, state)
            self._after_install(block, state)
            self.states.append(state)
        self.split_done = True

    def export(self) -> nn.Module:
        from .convert import export

        return export(self.model)


# -- helpers ----------------------------------------------------------------------------
def _groups(state: SDMoEState, views: dict[str, torch.Tensor]):
    """(projections, E x P x F x D tensor) to split together: gate and up of a fused [gate; up]
    gradient as one (E, 2, F, D) view (one batched pass), every other projection alone.
    E is the local expert count under FSDP2."""
    lay = state.fused
    if lay is not None and lay.concatenated and not lay.transposed and "gate" in views and "up" in views:
        gu = sharding.local(state.tails_gate_up.grad)
        yield ("gate", "up"), gu.view(gu.shape[0], 2, state.f, state.d)
        rest = [p for p in views if p not in ("gate", "up")]
    else:
        rest = list(views)
    for p in rest:
        yield (p,), views[p].unsqueeze(1)


def _stack_views(grads: list[torch.Tensor], state: SDMoEState, projs, shared: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared gradients of `projs` as one (P, F, D) tensor aliasing them when possible."""
    if len(projs) == 2 and state.by_host:
        return shared["gate_up"].view(2, state.f, state.d)  # concatenated, not transposed here
    if len(projs) == 1:
        return grads[0].unsqueeze(0)
    raise AssertionError("grouped projections need a fused full-form shared gradient")


def _host_tensors(block) -> list[torch.Tensor]:
    if block.layout == "fused":
        return [block.experts.gate_up_proj, block.experts.down_proj]
    from sdmoe.moe.layout import _mlp_names

    return [getattr(m, n).weight for m in block.experts for n in _mlp_names(m)]


@torch.no_grad()
def _rewrite_tails(block, state: SDMoEState, w: dict[str, torch.Tensor]) -> None:
    """Tails <- W - shared contribution, given canonical W (E x F x D) of the decomposed projections."""
    if state.layout == "fused":
        lay = state.fused
        if "gate" in state.projs or "up" in state.projs:
            full = state.materialise("gate_up")  # current W, to keep an undecomposed half as it is
            g, u = lay.gate_up_views(full)
            g = w.get("gate", g)
            u = w.get("up", u)
            state.assign("gate_up", -1, lay.gate_up_storage(g, u))
        if "down" in state.projs:
            state.assign("down", -1, lay.down_storage(w["down"]))
        return
    for p in state.projs:
        for i in range(state.e):
            wi = w[p][i]
            state.assign(p, i, wi.T if p == "down" else wi)


def _input_ids(batch) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, Mapping) else batch


def _forward(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(input_ids=batch)
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
