"""Real text to batches: corpora, tokenizer, token cache, training and eval batches.

Imports nothing of ours but `sdmoe.errors` (and the torch-free `sdmoe.config_fields`).
Names resolve on first use, so `sdmoe.data.config` loads without torch.
"""

from sdmoe.lazy import lazy_exports

_LAZY = {
    "DataConfig": "sdmoe.data.config",
    "Dataset": "sdmoe.data.dataset",
    "prepare_dataset": "sdmoe.data.dataset",
    "Document": "sdmoe.data.corpus",
    "load_corpus": "sdmoe.data.corpus",
}
__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
