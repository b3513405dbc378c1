"""SD-MoE: the spectral gradient split and the shared update over a plain transformers model; convert/export."""

import sys
import types

# Names resolve on first use, so `sdmoe.method.config` (and a run's whole config) loads without torch.
_LAZY = {
    "SDMoEConfig": "sdmoe.method.config",
    "SDMoE": "sdmoe.method.controller",
    "convert": "sdmoe.method.convert",
    "export": "sdmoe.method.convert",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdmoe.method' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`sdmoe.method.convert` is the function, as it always was, not the submodule of that name:
    the import system sets a package's attribute to each submodule it loads, which would
    otherwise shadow the lazily resolved function."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
