"""When SD-MoE does what: the split, the collection windows, refreshes and re-estimations.

Pure functions of the config and the step (steps count optimizer steps from 0), so a resumed
run keeps its schedule with no state of its own.
"""

from __future__ import annotations

from .config import SDMoEConfig


def split_due(cfg: SDMoEConfig, step: int) -> bool:
    """The split happens before the forward of the first step at or after `split_step`."""
    return step >= cfg.split_step


def in_window(cfg: SDMoEConfig, step: int, split_done: bool, collects: bool) -> bool:
    """Whether `step`'s gradients or layer inputs are collected for a basis (`collects`: the basis source needs
    any): the `basis_batches` steps before the split, and before each re-estimation."""
    if not collects:
        return False
    if not split_done:
        return cfg.split_step - cfg.basis_batches <= step < cfg.split_step
    if not cfg.reestimate_every:
        return False
    j = (step - cfg.split_step) % cfg.reestimate_every
    return step >= cfg.split_step and j >= cfg.reestimate_every - cfg.basis_batches


def _every(k: int, cfg: SDMoEConfig, step: int) -> bool:
    return bool(k) and step >= cfg.split_step and (step - cfg.split_step + 1) % k == 0


def refresh_due(cfg: SDMoEConfig, step: int) -> bool:
    """After `step`'s optimizer step: recompute the bases from their source (`refresh_every`)."""
    return _every(cfg.refresh_every, cfg, step)


def reestimate_due(cfg: SDMoEConfig, step: int) -> bool:
    """After `step`'s optimizer step: choose U again and split again (`reestimate_every`)."""
    return _every(cfg.reestimate_every, cfg, step)


def exact_due(cfg: SDMoEConfig, step: int) -> bool:
    """`step`'s split uses the exact top-r of its gradients (`exact_every`), measuring the tracker's drift; only a
    per-step split (`split.PerStepSplit`) tracks a basis, the other rules have none to replace."""
    return bool(cfg.exact_every) and step % cfg.exact_every == 0
