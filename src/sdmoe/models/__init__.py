"""Presets and small transformers MoE models.

Names resolve on first use: `from sdmoe.models.config import ModelConfig` (and
`sdmoe.train.config`) load without importing torch; `build_model` imports it.
"""

from sdmoe.lazy import lazy_exports

_LAZY = {
    "STYLES": "sdmoe.models.config",
    "ModelConfig": "sdmoe.models.config",
    "build_model": "sdmoe.models.build",
    "count_parameters": "sdmoe.models.build",
    "to_hf_config": "sdmoe.models.build",
}
__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
