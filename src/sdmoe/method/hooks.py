"""The forward hooks SD-MoE puts on a model, how `export` finds and removes them, and how a model's
driver is found from the model alone.

The host model carries no SD-MoE module or parameter at any step; the only things
the method attaches to it are forward pre-hooks, all instances of `SDMoEHook`:
- `SplitMark` on the model, from the split of an `SDMoE` until `export`: a second SDMoE
  would transform the same gradients twice (`split_by`);
- `DriverHook` on the model, while an `attach` handle's hooks drive it and its optimizer
  (`attached`): the split at split_step and the collection windows;
- the collectors of layer inputs on the routers, while a window for activation bases is
  open, and the Trainer callback's recorder of the last batch.
Nothing is kept outside the model: a second model is found unsplit and unattached, whatever
the first one's state, and a deep copy of a driven model is a new, undriven one.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


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
    """Base of every hook sdmoe registers; `remove_hooks` finds them by type (also under torch.compiler.disable's
    wrapper, whose `__wrapped__` is the hook)."""


class OwnedHook(SDMoEHook):
    """A forward pre-hook on a model that belongs to the SD-MoE object driving it (`owner`, whose `.model` is
    that model). A deep copy of the model shares the hook object, which then belongs to another model: the
    lookups below and the hook itself pass for the copy."""

    def __init__(self, owner):
        self.owner = owner

    def __deepcopy__(self, memo):
        return self  # not the owner, its optimizer and its model copied with every copy of the model

    def __call__(self, module, args):
        return None


class SplitMark(OwnedHook):
    """Marks a model split by `owner` (an `SDMoE`); does nothing in the forward."""


class DriverHook(OwnedHook):
    """An `attach` handle's forward pre-hook on the model (`owner.on_forward`: the split, the windows)."""

    def __call__(self, module, args):
        if module is self.owner.model:
            self.owner.on_forward(module, args)


def _owner(model: nn.Module, kind: type[OwnedHook]):
    for hook in list(model._forward_pre_hooks.values()):
        hook = inspect.unwrap(hook)
        if isinstance(hook, kind) and hook.owner.model is model:
            return hook.owner
    return None


def split_by(model: nn.Module):
    """The `SDMoE` that split `model` (the plain module, not a compile wrapper), or None."""
    return _owner(model, SplitMark)


def attached(model: nn.Module):
    """The `attach` handle whose hooks drive `model` (the plain module, not a compile wrapper), or None."""
    return _owner(model, DriverHook)


def remove_hooks(model: nn.Module) -> int:
    """Remove every sdmoe forward (pre-)hook from every module of `model`; returns how many."""
    n = 0
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(inspect.unwrap(hook), SDMoEHook):
                    del hooks[key]
                    for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(m, extra, {}).pop(key, None)
                    n += 1
    return n
