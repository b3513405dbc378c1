"""One-call conversion: `convert(model, cfg)` splits a model now (the per-expert form is
exact and function-preserving; the shared forms measure their change on `reference_batch`).
`export` (sdmoe.method.export) makes it ready to save again."""

from __future__ import annotations

from torch import nn

from .config import SDMoEConfig
from .controller import SDMoE
from .export import export, with_kv_cache

__all__ = ["convert", "export", "with_kv_cache"]


def convert(model: nn.Module, cfg: SDMoEConfig | None = None, reference_batch=None) -> SDMoE:
    """Split `model` in place immediately (ignores cfg.split_step); returns its controller
    (bind an optimizer with `bind_optimizer` to train it)."""
    ctl = SDMoE(model, cfg or SDMoEConfig(form="per_expert"))
    ctl.last_split = ctl.split(reference_batch)
    return ctl
