"""The shared parts' optimizer: its rate follows the experts' group's rate times `lr_shared_mult`."""

from __future__ import annotations

import pytest
import torch

import sdmoe
from sdmoe.method import SDMoEConfig

from .method_helpers import batch, lm_loss, make_model

LR = 1e-2


def _train(cfg: SDMoEConfig, steps: int = 4):
    model = make_model("qwen3_moe")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    handle = sdmoe.attach(model, opt, cfg, max_norm=1.0)
    lm_loss(model, batch(0)).backward()
    opt.step()  # step 0: the split
    opt.zero_grad()
    ctl = handle.controller
    tails = [{p: t.clone() for p, t in ctl.tails(li).items()} for li in range(len(ctl.layers))]
    shared = [{p: s.clone() for p, s in layer.shared.items()} for layer in ctl.layers]
    for step in range(1, steps):
        lm_loss(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return handle, opt, tails, shared


def _moved(before, after) -> float:
    return max(float((after[li][p] - t).norm() / t.norm()) for li, d in enumerate(before) for p, t in d.items())


def test_lr_shared_mult_0_freezes_the_shared_part_and_not_the_tails():
    handle, opt, tails, shared = _train(SDMoEConfig(split_step=0, lr_shared_mult=0.0))
    ctl = handle.controller
    assert ctl.shared_optimizer.param_groups[0]["lr"] == 0.0
    now_tails = [ctl.tails(li) for li in range(len(ctl.layers))]
    now_shared = [dict(layer.shared) for layer in ctl.layers]
    assert _moved(shared, now_shared) == 0.0
    assert _moved(tails, now_tails) > 1e-3


def test_the_shared_part_follows_the_experts_group_times_its_multiplier():
    handle, opt, _, _ = _train(SDMoEConfig(split_step=0, lr_shared_mult=2.0), steps=1)
    assert [len(g["params"]) for g in opt.param_groups] == [len(list(handle.model.parameters()))]  # no group added
    assert handle.controller.shared.rates() == pytest.approx((LR, 2.0 * LR, 0.1))
