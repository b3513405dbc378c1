"""The forward hooks SD-MoE puts on a model, and how `export` finds and removes them.

The host model carries no SD-MoE module or parameter at any step; the only things
the method attaches to it are forward pre-hooks (the residual router's input
projection, the collectors of layer inputs), all instances of `SDMoEHook`, and an
entry in `SPLIT_BY` (outside the model) while an `SDMoE` drives it, and in `ATTACHED` while
`sdmoe.attach`'s hooks on the model and its optimizer do.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# model -> the SDMoE that split it: a second controller would transform the same gradients twice.
# Outside the model (which stays plain), and weak: a copy of the model is a new, unsplit model.
SPLIT_BY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the `sdmoe.attach` handle whose hooks drive it (on the model and its optimizer): `export` detaches it
ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def uncompiled(model: nn.Module) -> nn.Module:
    """The module under `torch.compile(model)`'s wrapper (`OptimizedModule._orig_mod`), or `model` itself.

    SD-MoE keys its state on the plain module, so a compiled and an eager run name the same blocks and
    parameters (no `_orig_mod.` prefix), and `export` returns the module whose state_dict is a checkpoint's."""
    if "_orig_mod" not in getattr(model, "_modules", {}):  # cheap: no torch._dynamo import for a plain model
        return model
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


class SDMoEHook:
    """Base of every hook sdmoe registers; `remove_hooks` finds them by type."""


def sdmoe_hooks(model: nn.Module) -> list[tuple[nn.Module, SDMoEHook]]:
    """(module, hook) for every sdmoe forward (pre-)hook of `model`."""
    return [(m, h) for m in model.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks)
            for h in hooks.values() if isinstance(h, SDMoEHook)]


def remove_hooks(model: nn.Module) -> int:
    """Remove every sdmoe forward (pre-)hook from every module of `model`; returns how many."""
    n = 0
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, SDMoEHook):
                    del hooks[key]
                    for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(m, extra, {}).pop(key, None)
                    n += 1
    return n
