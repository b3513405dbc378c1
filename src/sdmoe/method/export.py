"""`export(model)`: a model ready to save as an ordinary transformers checkpoint.

The host's expert weights already are the trained W_i (SD-MoE never replaces them),
so export only folds a residual router's input projection into the router weight
and removes every SD-MoE hook; a vanilla transformers install loads the saved model
and computes the same logits. It also turns the KV cache on (`with_kv_cache`): the
exported model is for saving and generating.
"""

from __future__ import annotations

from torch import nn

from .hooks import ATTACHED, SPLIT_BY, remove_hooks, sdmoe_hooks, uncompiled
from .router import ResidualRouterInput, fold


def export(model: nn.Module) -> nn.Module:
    """In place: residual routers folded into their weights, no SD-MoE hook left, KV cache on. Returns the
    plain model (the module under a `torch.compile` wrapper: its state_dict has no `_orig_mod.` prefix)."""
    model = uncompiled(model)
    if (handle := ATTACHED.get(model)) is not None:
        handle.detach()  # the driver's hooks on the model and its optimizer
    for module, hook in sdmoe_hooks(model):
        if isinstance(hook, ResidualRouterInput):
            fold(module, hook.basis)
    remove_hooks(model)
    SPLIT_BY.pop(model, None)  # no longer driven: a new SDMoE may split it
    return with_kv_cache(model)


def with_kv_cache(model: nn.Module) -> nn.Module:
    """In place: `use_cache=True` in the model's config and generation config, so the saved model generates fast.

    Models are built for training with `use_cache=False` (a training forward has no use for a KV
    cache). A saved model is for inference, where `false` in config.json / generation_config.json
    makes `generate` recompute the whole prefix for every token, in sdmoe and plain transformers alike.
    """
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = True
    return model
