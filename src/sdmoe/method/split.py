"""The gradient split of one MoE layer: each expert's gradient cut to its tail in place, the shared
part's gradient handed to its delta (`after_backward`, after the split).

Which rule (`SDMoEConfig.gradient_split`):
- "per_step": the basis tracked through this step's gradients (`core.track_basis`), or, with
  `tracker_lag=1`, through the last step's, the tracking step made from the split's own products;
- "fixed": the layer's basis U, one- or two-sided (`projection_sides`);
- "none": the control: the tails keep their whole gradients, the shared part gets their plain sum.
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


@torch.no_grad()
def split_layer(layer: LayerState, cfg: SDMoEConfig, exact: bool = False,
                drift: dict[str, torch.Tensor] | None = None, key: str = "",
                observe: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Split `layer`'s gradients in place (the tails) and set each shared delta's `.grad`.

    exact: split in the exact top-r of this step's gradients, recording the tracker's drift from it
    into `drift[f"{key}.{p}"]`. observe(p, g_EFD) sees each whole gradient before the split (a
    re-estimation's collection window). Projections without gradients are skipped. No host syncs; on
    FSDP2-sharded experts the sums over all experts are all-reduced (`sharding.reducer`)."""
    views, commit = layer.block.views("grad", layer.projs)
    if observe is not None:
        for p, g in views.items():
            observe(p, g)
    projs = tuple(p for p in layer.projs if p in views)
    if projs:
        reduce = sharding.reducer(layer.block.host_parameters(layer.projs)[0].grad)
        shared = _split(layer, cfg, projs, [views[p] for p in projs], exact, reduce, drift, key)
        for k, p in enumerate(projs):
            layer.delta[p].grad = shared[:, k] if layer.form == "per_expert" else shared[k]
    commit()


def _split(layer: LayerState, cfg: SDMoEConfig, projs: tuple[str, ...], gs: list[torch.Tensor], exact: bool,
           reduce: Reduce, drift: dict | None, key: str) -> torch.Tensor:
    """Split gradients `gs` (canonical views of `projs`, edited in place into the tails); returns the
    shared parts' gradients, (P, ...) or per_expert (E, P, ...)."""
    form = layer.form
    if cfg.gradient_split == "none":  # the control: the plain sum
        return core.shared_gradient(gs, form, None, reduce)
    if cfg.gradient_split == "fixed":
        u, u_f = layer.stacked("basis", projs), layer.stacked("basis_f", projs)
        if u_f is None:
            return core.split_gradient(gs, u, form, cfg.normalize_tail_updates, reduce)
        shared = core.shared_gradient(gs, form, u, reduce, u_f)
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
        exact_PDX = exact_basis(layer.r, projs, gs, q_PDX, reduce, drift, key) if exact else None
        shared = core.split_gradient(gs, q_PDX[..., : layer.r], form, cfg.normalize_tail_updates, reduce,
                                     track_PDX=q_PDX, rayleigh_ritz=rr)
        if exact_PDX is not None:
            q_PDX.copy_(exact_PDX)
    else:
        q = core.track_basis(gs, q_PDX, cfg.tracker_iters, layer.r, rr, reduce)
        if exact:  # this step splits in the exact basis
            q_PDX.copy_(exact_basis(layer.r, projs, gs, q_PDX, reduce, drift, key))
        if form == "full":
            shared = core.split_gradient(gs, q, form, cfg.normalize_tail_updates, reduce)
        else:  # per_expert keeps its shared gradient in U, the tails are cut in the tracked Q
            shared = core.shared_gradient(gs, form, layer.stacked("basis", projs), reduce)
            core.split_tails(gs, q, cfg.normalize_tail_updates)
    if not whole:
        layer.q_PDX[index] = q_PDX
    return shared


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
