"""sdmoe: Spectral-Decoupled Mixture-of-Experts on Hugging Face transformers.

    import sdmoe
    controller = sdmoe.SDMoE(model, sdmoe.SDMoEConfig(split_step=100))  # drive it from your loop
    sdmoe.convert(model, sdmoe.SDMoEConfig(mode="per_expert"))          # exact conversion now
    sdmoe.export(model)                                                  # ready to save: a plain checkpoint
"""

__version__ = "0.2.0.dev0"

# Resolved on first use, so `sdmoe --help` does not pay for importing torch.
_LAZY = {
    "SDMoE": "sdmoe.method",
    "SDMoEConfig": "sdmoe.method",
    "convert": "sdmoe.method",
    "export": "sdmoe.method",
    "SDMoECallback": "sdmoe.integrations",
    "analyze_model": "sdmoe.analysis",
    "analyze_path": "sdmoe.analysis",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdmoe' has no attribute {name!r}")
