"""sdmoe: Spectral-Decoupled Mixture-of-Experts on Hugging Face transformers.

    import sdmoe
    handle = sdmoe.attach(model, optimizer, sdmoe.SDMoEConfig(split_step=100), max_norm=1.0)  # hooks: a plain loop
    sdmoe.convert(model, sdmoe.SDMoEConfig(form="per_expert"))          # exact conversion now
    sdmoe.export(model)                                                  # ready to save: a plain checkpoint

`sdmoe.SDMoETrainerCallback` does the same inside `transformers.Trainer`; OLMo-core's and
torchtitan's are in `sdmoe.integrations.olmo_core` and `sdmoe.integrations.torchtitan`.
"""

__version__ = "0.2.0.dev0"

from sdmoe.lazy import lazy_exports

# Resolved on first use, so `sdmoe --help` does not pay for importing torch.
_LAZY = {
    "attach": "sdmoe.method",
    "Attached": "sdmoe.method",
    "SDMoE": "sdmoe.method",
    "SDMoEConfig": "sdmoe.method",
    "convert": "sdmoe.method",
    "export": "sdmoe.method",
    "SDMoETrainerCallback": "sdmoe.integrations",
    "analyze_model": "sdmoe.analysis",
    "analyze_path": "sdmoe.analysis",
}
__all__ = ["__version__", *_LAZY]

__getattr__ = lazy_exports(__name__, _LAZY)
