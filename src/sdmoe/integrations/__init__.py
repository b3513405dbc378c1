"""Adapters to other trainers: `SDMoETrainerCallback` for `transformers.Trainer` (and accelerate under it).

The training stacks' modules are imported only when used, each needing its extra (docs/integrations.md):
`sdmoe.integrations.olmo_core` (OLMo-core's trainer callback, `SDMoEOlmoCoreCallback`) and
`sdmoe.integrations.torchtitan` (torchtitan's optimizer hooks, `SDMoETrainer`)."""

from .trainer_callback import SDMoETrainerCallback

__all__ = ["SDMoETrainerCallback"]
