"""SD-MoE: the spectral gradient split and the shared update over a plain transformers model; convert/export.

`export` is the function of the module of that name, loaded here (it imports no torch until called), so the
package's `export` is the function whatever is imported later. The rest resolves on first use, so
`sdmoe.method.config` (and a run's whole config) loads without torch.
"""

from sdmoe.lazy import lazy_exports

from .export import export

_LAZY = {
    "SDMoEConfig": "sdmoe.method.config",
    "SDMoE": "sdmoe.method.controller",
    "convert": "sdmoe.method.controller",
    "attach": "sdmoe.method.driver",
    "Attached": "sdmoe.method.driver",
}
__all__ = [*_LAZY, "export"]

__getattr__ = lazy_exports(__name__, _LAZY)
