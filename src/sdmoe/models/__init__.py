"""Presets and small transformers MoE models.

Names resolve on first use: `from sdmoe.models.config import ModelConfig` (and
`sdmoe.train.config`) load without importing torch; `build_model` imports it.
"""

_LAZY = {
    "STYLES": "sdmoe.models.config",
    "ModelConfig": "sdmoe.models.config",
    "build_model": "sdmoe.models.build",
    "count_parameters": "sdmoe.models.build",
    "to_hf_config": "sdmoe.models.build",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdmoe.models' has no attribute {name!r}")
