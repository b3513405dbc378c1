"""Where a transformers model keeps its experts and router (`layout`), checkpoints on disk, sharded reads."""

import importlib

__all__ = ["MoEBlock", "find_moe_blocks"]


def __getattr__(name: str) -> object:
    # Resolved on first use (PEP 562): `sdmoe.moe.projections` loads without torch.
    if name in __all__:
        return getattr(importlib.import_module("sdmoe.moe.layout"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
