"""Step time of SD-MoE against the baseline, measured fairly: one process, interleaved steps.

Run-against-run step times (what a compare's metrics hold) move with whatever
else the machine does. Here both models live in one process and alternate
step by step (A B A B ...), so drift and load hit both sides alike; the ratio
is taken per round and the rounds give an interval. The split happens at
step 0, so every timed SD-MoE step carries its whole overhead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sdmoe.eval.perplexity import causal_lm_loss
from sdmoe.method import SDMoE
from sdmoe.models import build_model
from sdmoe.train.config import RunConfig
from sdmoe.train.optim import build_optimizer


def training_step(cfg: RunConfig, data) -> Callable[[], None]:
    """One full optimizer step of `cfg` (forward, loss, backward, SD-MoE split, clip, AdamW) per call."""
    model = build_model(cfg.model, len(data.tokenizer), seed=cfg.loop.seed, eos_token_id=data.tokenizer.eos_token_id)
    optimizer = build_optimizer(model, cfg.optim)
    controller = None
    if cfg.method == "sd-moe":
        controller = SDMoE(model, cfg.sdmoe)
        controller.split()
        controller.bind_optimizer(optimizer)
    step = [0]

    def run() -> None:
        input_ids, _ = data.train.sample(step[0])
        out = model(input_ids=input_ids)
        loss = causal_lm_loss(out.logits, input_ids)
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + cfg.model.aux_loss_coef * out.aux_loss
        loss.backward()
        if controller is not None:
            controller.after_backward(step[0])
            controller.clip_grad_norm_(cfg.optim.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        if controller is not None:
            controller.after_optimizer_step(step[0])
        optimizer.zero_grad(set_to_none=True)
        step[0] += 1

    return run


def interleaved_step_times(
    configs: dict[str, RunConfig], data, rounds: int = 5, steps_per_round: int = 8, warmup: int = 3
) -> dict[str, list[float]]:
    """Median step time (s) of each config per round; configs alternate step by step."""
    steps = {name: training_step(cfg, data) for name, cfg in configs.items()}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    medians: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(steps_per_round):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        for name, values in samples.items():
            medians[name].append(statistics.median(values))
    return medians
