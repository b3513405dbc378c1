"""Real text to batches: corpora, tokenizer, token cache, training and eval batches.

Imports nothing of ours but `sdmoe.errors`.
"""

from sdmoe.data.corpus import Document, load_corpus
from sdmoe.data.dataset import DataConfig, Dataset, prepare_dataset

__all__ = ["DataConfig", "Dataset", "Document", "load_corpus", "prepare_dataset"]
