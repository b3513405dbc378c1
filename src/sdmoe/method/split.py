"""The gradient split of one MoE layer: the rules, chosen once, and `split_layer`, which runs a layer's.

A rule is an object built once from the config's strings (`split_rule`, the one place they are
compared), with the options that concern it as plain parameters; the rest of `method/` asks it:

    rule              the tails' gradient (in place)             the shared part's gradient
    PerStepSplit      G_i (I - Q Q^T), Q tracked this step        full: (sum_i G_i) Q Q^T; per_expert: G_i U
    FixedSplit        G_i (I - U U^T)                             (sum_i G_i) U U^T, (sum_i G_i) U, G_i U
    TwoSidedSplit     (I - P_F) G_i (I - P_D), the paper's        the rest: P_F G + (I - P_F) G P_D of the sum
    NoSplit           G_i, the control                            sum_i G_i

A rule also says what a layer holds (a tracked basis, the ffn side's basis) and whether the tails are
kept out of U: projected at the split and after every optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdmoe.spectral import data_subspace

from . import core, sharding
from .basis import gram
from .config import SDMoEConfig
from .layer import LayerState

Reduce = Callable[[torch.Tensor], None] | None


class SplitRule:
    """How a layer's gradients are split: one of the four rules below, chosen by `split_rule`."""

    tracked = False  # the layer holds a basis tracked from the gradients (`LayerState.q_PDX`)
    two_sided = False  # the layer holds the ffn side's basis too (`LayerState.basis_f`)
    keeps_tails_out = False  # the tails are re-projected out of U after every optimizer step

    def __init__(self, form: str = "full"):
        self.form = form  # the shared part's form, as `core` takes it: "full", "lowrank" or "per_expert"

    @property
    def projects_at_split(self) -> bool:
        """Whether the split projects the tails out of U: where the rule keeps them out, and in the low-rank
        and per-expert forms, whose shared part stands for W_i inside U only (that changes the function,
        except per_expert: exact)."""
        return self.keeps_tails_out or self.form != "full"

    def width(self, rank: int, hidden: int) -> int:
        """Columns of the bases a layer of this rank takes (`choose_bases`)."""
        return rank

    def split(self, layer: LayerState, projs: tuple[str, ...], gs: list[torch.Tensor], reduce: Reduce,
              exact: bool = False, drift: dict | None = None, key: str = "") -> torch.Tensor:
        """Cut gradients `gs` (canonical views of `projs`) into the tails in place; return the shared parts'
        gradients, (P, ...) or per_expert (E, P, ...)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class PerStepSplit(SplitRule):
    """The default: the tails lose this step's common gradient subspace, tracked by `iters` warm-started
    subspace iterations (`oversample` extra columns, Rayleigh-Ritz picking the best r). In the per-expert
    form the shared gradient stays in U and the tails are re-projected against it after the step."""

    tracked = True

    def __init__(self, form: str = "full", iters: int = 1, oversample: int = 0):
        super().__init__(form)
        self.iters, self.oversample = iters, oversample

    @property
    def keeps_tails_out(self) -> bool:
        return self.form == "per_expert"

    def width(self, rank: int, hidden: int) -> int:
        return min(rank + self.oversample, hidden)

    def split(self, layer, projs, gs, reduce, exact=False, drift=None, key=""):
        # the tracked basis: one buffer for the layer's projections (a copy if some lack gradients)
        whole = len(projs) == len(layer.projs)
        index = [layer.projs.index(p) for p in projs]
        q_PDX = layer.q_PDX if whole else layer.q_PDX[index]
        q = core.track_basis(gs, q_PDX, self.iters, layer.r, self.oversample > 0, reduce)
        if exact:  # this step splits in the exact basis (`exact_every`), the tracker's drift recorded
            q_PDX.copy_(exact_basis(layer.r, projs, gs, q_PDX, reduce, drift, key))
        if self.form == "full":
            shared = core.split_gradient(gs, q, self.form, reduce)
        else:  # per_expert keeps its shared gradient in U, the tails are cut in the tracked Q
            shared = core.shared_gradient(gs, self.form, layer.stacked("basis", projs), reduce)
            core.split_tails(gs, q)
        if not whole:
            layer.q_PDX[index] = q_PDX
        return shared


class FixedSplit(SplitRule):
    """The layer's basis U, fixed between re-estimations, on the hidden side; the tails kept out of it."""

    keeps_tails_out = True

    def split(self, layer, projs, gs, reduce, exact=False, drift=None, key=""):
        return core.split_gradient(gs, layer.stacked("basis", projs), self.form, reduce)


class TwoSidedSplit(SplitRule):
    """The paper's: fixed bases on both sides of the full shared weight, P_D = U U^T and P_F on the ffn side;
    the unique part (I - P_F) G_i (I - P_D) to the tails, the rest of the sum to the shared part."""

    two_sided = True
    keeps_tails_out = True

    def __init__(self):
        super().__init__("full")

    def split(self, layer, projs, gs, reduce, exact=False, drift=None, key=""):
        u, u_f = layer.stacked("basis", projs), layer.stacked("basis_f", projs)
        shared = core.shared_gradient(gs, self.form, u, reduce, u_f)
        core.split_tails(gs, u, u_f)
        return shared


class NoSplit(SplitRule):
    """The control: the same W_i = C_i + T_i, plain gradients: the tails keep theirs, C gets their sum."""

    def split(self, layer, projs, gs, reduce, exact=False, drift=None, key=""):
        return core.shared_gradient(gs, self.form, None, reduce)


def split_rule(cfg: SDMoEConfig) -> SplitRule:
    """The rule `cfg` names (`gradient_split`, `projection_sides`, `form`, and the tracker's options)."""
    if cfg.gradient_split == "none":
        return NoSplit(cfg.form)
    if cfg.gradient_split == "per_step":
        return PerStepSplit(cfg.form, cfg.tracker_iters, cfg.tracker_oversample)
    if cfg.projection_sides == "two":
        return TwoSidedSplit()
    return FixedSplit(cfg.form)


@torch.no_grad()
def split_layer(layer: LayerState, *, exact: bool = False, drift: dict[str, torch.Tensor] | None = None,
                key: str = "", observe: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Split `layer`'s gradients in place (the tails) by its rule and set each shared delta's `.grad`.

    exact: a per-step split splits in the exact top-r of this step's gradients, recording the tracker's
    drift from it into `drift[f"{key}.{p}"]`. observe(p, g_EFD) sees each whole gradient before the split
    (a re-estimation's collection window). Projections without gradients are skipped. No host syncs; on
    sharded experts the sums over all experts are all-reduced (`sharding.reducer`)."""
    views, commit = layer.block.views("grad", layer.projs)
    if observe is not None:
        for p, g in views.items():
            observe(p, g)
    projs = tuple(p for p in layer.projs if p in views)
    if projs:
        reduce = sharding.reducer(layer.block.host_parameters(layer.projs)[0].grad)
        shared = layer.rule.split(layer, projs, [views[p] for p in projs], reduce, exact, drift, key)
        for k, p in enumerate(projs):
            layer.delta[p].grad = shared[:, k] if layer.form == "per_expert" else shared[k]
    commit()


def exact_basis(r: int, projs: tuple[str, ...], gs: list[torch.Tensor], q_PDX: torch.Tensor, reduce: Reduce,
                drift: dict | None, key: str) -> torch.Tensor:
    """The exact top-X of this step's gradients (read before the split); records the drift of the tracked
    basis q_PDX, the one this step's split would otherwise use, from it (`exact_every`)."""
    out = torch.empty_like(q_PDX)
    for k, (p, g) in enumerate(zip(projs, gs)):
        m = gram(g)
        if reduce is not None:
            reduce(m)
        out[k] = data_subspace(m, q_PDX.shape[-1])[0].to(q_PDX.dtype)
        if drift is not None:
            drift[f"{key}.{p}"] = core.drift(q_PDX[k, :, :r], out[k, :, :r])
    return out
