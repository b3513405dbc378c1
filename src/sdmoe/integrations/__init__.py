"""Adapters to other trainers: `SDMoECallback` for `transformers.Trainer` (and accelerate under it)."""

from .trainer_callback import SDMoECallback

__all__ = ["SDMoECallback"]
