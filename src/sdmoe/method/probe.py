"""`ChangeProbe`: how much a split or a re-estimation changed each MoE block's output and the logits.

It records each block's inputs and outputs on a reference batch before the change; after it,
`record` runs the blocks again on the same inputs and writes the relative changes into the
split's (or re-estimation's) record. A function-preserving conversion reads about 1e-7 here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sdmoe.moe.forward import logits
from sdmoe.moe.sharding import unsharded


def input_ids(batch) -> torch.Tensor:
    """A reference batch's token ids: the tensor itself, or its "input_ids"."""
    return batch["input_ids"] if isinstance(batch, Mapping) else batch


def forward_logits(model: nn.Module, batch) -> torch.Tensor:
    """The model's logits on a reference batch (a LongTensor, or a dict of the model's inputs)."""
    if not isinstance(batch, Mapping):
        return logits(model, batch)
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


class ChangeProbe:
    """Each MoE block's inputs and outputs on a reference batch, to measure a conversion's change."""

    def __init__(self, model: nn.Module, blocks, batch):
        self.model, self.blocks, self.batch = model, blocks, batch
        self.inputs, self.outputs = {}, {}
        handles = []
        for i, b in enumerate(blocks):
            handles.append(b.module.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            handles.append(b.module.register_forward_hook(self._post(i)))
        try:
            with torch.no_grad():
                self.logits = forward_logits(model, batch).detach().clone()
        finally:
            for h in handles:
                h.remove()

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (args, kwargs)
        return hook

    def _post(self, i):
        def hook(module, args, out):
            self.outputs[i] = _first(out).detach().clone()
        return hook

    @torch.no_grad()
    def record(self, out: dict) -> None:
        """Write each layer's output change (and the logits') into a split/re-estimation record."""
        changes, logits_change = self.changes()
        for rec, c in zip(out["layers"], changes):
            rec["rel_change"] = c
        out["logits_rel_change"] = logits_change

    @torch.no_grad()
    def changes(self) -> tuple[list[float], float]:
        rel = []
        for i, b in enumerate(self.blocks):
            args, kwargs = self.inputs[i]
            with unsharded(self.model, b.name):  # called alone, outside its FSDP2 unit's forward
                new = _first(b.module(*args, **kwargs))
            rel.append(_rel(new, self.outputs[i]))
        return rel, _rel(forward_logits(self.model, self.batch), self.logits)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
