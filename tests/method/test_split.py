"""`split_layer`: one layer's gradients cut into tails in place, the shared part's gradient on its deltas."""

from __future__ import annotations

import pytest
import torch

from sdmoe.method import SDMoE, SDMoEConfig
from sdmoe.method.split import split_layer

from .method_helpers import batch, lm_loss, make_model


def _split_model(kind: str, **cfg):
    model = make_model(kind)
    ctl = SDMoE(model, SDMoEConfig(split_step=0, rank=4, **cfg))
    ctl.split()
    lm_loss(model, batch(0)).backward()
    return ctl


@pytest.mark.parametrize("kind", ["qwen3_moe", "module_list"])
@pytest.mark.parametrize("rule", ["per_step", "fixed", "none"])
def test_the_parts_sum_to_the_gradient_and_the_tails_leave_the_basis(kind, rule):
    ctl = _split_model(kind, gradient_split=rule)
    layer = ctl.layers[0]
    whole = {p: g.clone() for p, g in layer.block.canonical("grad").items()}
    seen = {}
    split_layer(layer, ctl.cfg, observe=lambda p, g: seen.setdefault(p, g.clone()))
    tails = layer.block.canonical("grad")
    for p in layer.projs:
        torch.testing.assert_close(seen[p], whole[p])  # observe sees the whole gradient, before the split
        shared = layer.delta[p].grad
        if rule == "none":  # the control: the whole gradients on the tails, their plain sum on the shared part
            torch.testing.assert_close(tails[p], whole[p])
            torch.testing.assert_close(shared, whole[p].sum(0))
        else:
            # the shared part's gradient is the experts' sum less the tails' sum: sum_i G_i = shared + sum_i T_i
            torch.testing.assert_close(shared + tails[p].sum(0), whole[p].sum(0), atol=1e-5, rtol=1e-4)
            q = layer.q[p][:, : layer.r] if rule == "per_step" else layer.basis[p]
            assert float((tails[p] @ q).norm() / tails[p].norm()) < 1e-5


def test_exact_steps_record_the_trackers_drift():
    ctl = _split_model("qwen3_moe")
    drift = {}
    split_layer(ctl.layers[0], ctl.cfg, exact=True, drift=drift, key="0")
    assert set(drift) == {"0.gate", "0.up", "0.down"} and all(0 <= float(v) <= 1 for v in drift.values())
