"""`export(model)`: a model ready to save as an ordinary transformers checkpoint; `sdmoe.export`.

The host's expert weights already are the trained W_i (SD-MoE never replaces them), so export
only removes every SD-MoE hook (and an `attach` handle's hooks on the optimizer with them); a
vanilla transformers install loads the saved model and computes the same logits. It also turns
the KV cache on (`with_kv_cache`): the exported model is for saving and generating.

Imports no torch until called, so the package `sdmoe.method` can load it with its config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def export(model: nn.Module) -> nn.Module:
    """In place: no SD-MoE hook left on the model, the `attach` handle driving it detached, KV cache on.
    Returns the plain model (the module under a `torch.compile` wrapper: its state_dict has no `_orig_mod.`
    prefix). The split's state stays with its `SDMoE`; the model is no longer split: a new SDMoE may split it."""
    from .hooks import attached, remove_hooks, uncompiled

    model = uncompiled(model)
    if (handle := attached(model)) is not None:
        handle.detach()  # the driver's hooks on the model and its optimizer
    remove_hooks(model)
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
