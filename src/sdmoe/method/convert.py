"""One-call conversion and export.

`convert(model, cfg)` splits a model now (mode "per_expert" is exact and
function-preserving; "shared" measures its change on `reference_batch`).
`export(model)` writes every W_i back into the host model's own parameters,
folds a residual router into the router weight, and removes every SD-MoE
module, parametrization and hook: a vanilla transformers install loads the
saved model and computes the same logits. It also turns the KV cache on
(`with_kv_cache`): the exported model is for saving and generating.
"""

from __future__ import annotations

from torch import nn

from sdmoe.errors import UserError

from .config import SDMoEConfig
from .controller import SDMoE
from .parametrization import STATE_NAME, SDMoEState, remove_hooks, uninstall
from .router import fold


def convert(model: nn.Module, cfg: SDMoEConfig | None = None, reference_batch=None) -> SDMoE:
    """Split `model` in place immediately (ignores cfg.split_step); returns its controller."""
    ctl = SDMoE(model, cfg or SDMoEConfig(mode="per_expert"))
    ctl.last_split = ctl.split(reference_batch)
    return ctl


def export(model: nn.Module) -> nn.Module:
    """In place: W_i back into the host's weights, residual router folded, no SD-MoE trace left."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, STATE_NAME, None), SDMoEState)]
    if not blocks and not remove_hooks(model):
        raise UserError("export(model): this model holds no SD-MoE split; nothing to export")
    for block in blocks:
        state = getattr(block, STATE_NAME)
        if hasattr(state, "router_basis"):
            router = next((getattr(block, a) for a in ("gate", "router")
                           if getattr(getattr(block, a, None), "weight", None) is not None
                           and getattr(block, a).weight.shape[0] == state.e), None)
            fold(router, state.router_basis)
        uninstall(block)
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
