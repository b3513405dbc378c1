"""Running a host model on token ids, whatever its stack: its logits.

transformers models take `input_ids=` (and `use_cache=`) and return an output with `.logits`;
OLMo-core's Transformer takes `input_ids` and returns the logits; torchtitan's decoders take the
tokens positionally and return the logits. The forward's own signature says which.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def logits(model: nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    """B x T x V logits of `model` on token ids (no KV cache where the model has one)."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" in params:
        out = model(input_ids=ids_BT, **({"use_cache": False} if "use_cache" in params else {}))
    else:
        out = model(ids_BT)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
