"""sdmoe: Spectral-Decoupled Mixture-of-Experts on Hugging Face transformers."""

__version__ = "0.1.0"
