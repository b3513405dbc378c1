"""sdmoe: Spectral-Decoupled Mixture-of-Experts on Hugging Face transformers.

    import sdmoe
    controller = sdmoe.SDMoE(model, sdmoe.SDMoEConfig(split_step=100))  # drive it from your loop
    sdmoe.convert(model, sdmoe.SDMoEConfig(form="per_expert"))          # exact conversion now
    sdmoe.export(model)                                                  # ready to save: a plain checkpoint
"""

__version__ = "0.2.0.dev0"

from sdmoe.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _LAZY)
