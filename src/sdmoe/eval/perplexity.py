"""Held-out loss per domain: the number every comparison in this project rests on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_loss(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats (labels are the inputs shifted by one)."""
    return F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), input_ids_BS[:, 1:].flatten())


@torch.no_grad()
def evaluate_loss(model: nn.Module, val: dict[str, list[torch.Tensor]], device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean loss per domain over fixed batches, plus `mean` (the unweighted mean of domains)."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for domain, batches in val.items():
        # Weight by rows: a domain's last batch may be short.
        total = sum(causal_lm_loss(model(input_ids=b.to(device)).logits, b.to(device)).item() * len(b) for b in batches)
        out[domain] = total / sum(len(b) for b in batches)
    out["mean"] = sum(out.values()) / len(out)
    model.train(was_training)
    return out


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 50.0))
