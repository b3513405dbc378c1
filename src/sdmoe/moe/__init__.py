from sdmoe.moe.layout import MoEBlock, find_moe_blocks

__all__ = ["MoEBlock", "find_moe_blocks"]
