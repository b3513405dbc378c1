"""AdamW with per-group learning-rate multipliers, and the warm-up + cosine schedule.

The schedule is a plain function of the step that the loop applies to every
group as `lr = base_lr * group["lr_mult"] * lr_scale(step)`. SD-MoE adds
parameter groups in the middle of a run (at the split), which a scheduler
object built at step 0 would not know about; a function of the step has no
such state and resumes exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sdmoe.train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices decay, vectors (norms, biases) do not: the usual GPT recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_scale(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float, scale: float) -> float:
    lr = base_lr * scale
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr
