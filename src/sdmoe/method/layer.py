"""`LayerState`: one MoE block's SD-MoE tensors, all outside the model, and the rule that splits it.

Per projection: the basis U (D x R), on a two-sided split the ffn side's basis too,
the shared part (S, A or A_i; `core.shared_at_split`) kept so the tails T_i = W_i - C_i
can be measured and re-projected, and a zero "shared delta", the parameter the shared
optimizer steps (`shared_optimizer.SharedOptimizer`). A per-step split adds the tracked
bases of the layer's projections in one (P, D, X) buffer, which the tracker's batched
QR writes in place. Which of them a layer holds, the split rule says (`split.SplitRule`).
"""

from __future__ import annotations

import torch
from torch import nn

from sdmoe.moe import MoEBlock
from sdmoe.moe.projections import PROJECTIONS

from . import core


class LayerState:
    """One MoE block's split: its rule, bases, tracked bases, shared parts and their deltas.

    rule: the layer's `split.SplitRule` (its form, and whether it tracks a basis or has two sides);
    projections: the ones it decomposes (any order: kept in storage order); width: tracked columns."""

    def __init__(self, block: MoEBlock, rule, projections: tuple[str, ...], rank: int, width: int):
        self.block, self.rule, self.r, self.form = block, rule, rank, rule.form
        self.projs = tuple(p for p in PROJECTIONS if p in projections)  # in storage order, whatever the config's
        e, f, d = block.num_experts, block.expert_ffn, block.hidden_size
        ref = next(block.experts.parameters())
        dt, dev = ref.dtype, ref.device
        self.basis = {p: torch.zeros(d, rank, dtype=torch.float32, device=dev) for p in self.projs}
        # the ffn side's basis of a two-sided split (P_F = basis_f basis_f^T)
        self.basis_f = ({p: torch.zeros(f, rank, dtype=torch.float32, device=dev) for p in self.projs}
                        if rule.two_sided else {})
        # the tracked bases of all projections in one (P, D, X) buffer: the tracker's batched QR writes it
        # in place; `q` gives each projection's (D, X) view of it
        self.q_PDX = (torch.zeros(len(self.projs), d, width, dtype=torch.float32, device=dev)
                      if rule.tracked else None)
        shape = {"full": (f, d), "lowrank": (f, rank), "per_expert": (e, f, rank)}[self.form]
        self.shared = {p: torch.zeros(shape, dtype=dt, device=dev) for p in self.projs}
        self.delta = {p: nn.Parameter(torch.zeros(shape, dtype=dt, device=dev)) for p in self.projs}

    @property
    def q(self) -> dict[str, torch.Tensor]:
        """Each projection's tracked basis (D x X), a view of `q_PDX` ({} unless the split is per_step)."""
        return {} if self.q_PDX is None else dict(zip(self.projs, self.q_PDX.unbind(0)))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state to save, by name (the q_* are views of one buffer: load them with copy_)."""
        out = {}
        for name in ("basis", "basis_f", "q", "shared"):
            out.update({f"{name}_{p}": t for p, t in getattr(self, name).items()})
        return out

    def owned(self) -> list[torch.Tensor]:
        """Every tensor this layer allocated (what `SDMoE.to` moves), deltas included."""
        out = [*self.basis.values(), *self.basis_f.values(), *self.shared.values(), *self.delta.values()]
        return out if self.q_PDX is None else [*out, self.q_PDX]

    def contribution(self, p: str) -> torch.Tensor:
        """C (or C_i) of projection p: the part of every W_i the shared part stands for."""
        return core.shared_contribution(self.shared[p], self.basis[p], self.form)

    def stacked(self, name: str, projs: tuple[str, ...]) -> torch.Tensor | None:
        """basis or basis_f of `projs` as one (P, n, R) tensor (None where the layer has none)."""
        bases = getattr(self, name)
        return torch.stack([bases[p] for p in projs]) if bases else None

    def set_bases(self, p: str, bases: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """U (and the ffn side's basis) of projection p from a basis choice's first R columns."""
        u, u_f = bases
        self.basis[p].copy_(u[:, : self.r])
        if u_f is not None:
            self.basis_f[p].copy_(u_f[:, : self.r])
