"""Where a model keeps its experts and router: the MoE blocks (`layout`), the layout adapters that read each way
of keeping experts (`adapters`: fused, stacked, module list) and routers (`routers`), checkpoints on disk
(`checkpoint`, over `stored` files and `quantized` tensors), FSDP2-sharded reads (`sharding`)."""

import importlib

__all__ = ["MoEBlock", "find_moe_blocks"]


def __getattr__(name: str) -> object:
    # Resolved on first use (PEP 562): `sdmoe.moe.projections` loads without torch.
    if name in __all__:
        return getattr(importlib.import_module("sdmoe.moe.layout"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
