"""SD-MoE: the spectral gradient split and the shared update over a plain transformers model; convert/export."""

import sys
import types

from sdmoe.lazy import lazy_exports

# Names resolve on first use, so `sdmoe.method.config` (and a run's whole config) loads without torch.
_LAZY = {
    "SDMoEConfig": "sdmoe.method.config",
    "SDMoE": "sdmoe.method.controller",
    "attach": "sdmoe.method.driver",
    "Attached": "sdmoe.method.driver",
    "convert": "sdmoe.method.convert",
    "export": "sdmoe.method.export",
}
__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)


class _Package(types.ModuleType):
    """`sdmoe.method.convert` is the function, as it always was, not the submodule of that name:
    the import system sets a package's attribute to each submodule it loads, which would
    otherwise shadow the lazily resolved function."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
