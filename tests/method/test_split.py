"""The split rules and `split_layer`: one layer's gradients cut into tails in place, the shared part's
gradient on its deltas."""

from __future__ import annotations

import pytest
import torch

from sdmoe.method import SDMoE, SDMoEConfig
from sdmoe.method.split import FixedSplit, NoSplit, PerStepSplit, TwoSidedSplit, split_layer, split_rule

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
    split_layer(layer, observe=lambda p, g: seen.setdefault(p, g.clone()))
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
    split_layer(ctl.layers[0], exact=True, drift=drift, key="0")
    assert set(drift) == {"0.gate", "0.up", "0.down"} and all(0 <= float(v) <= 1 for v in drift.values())


@pytest.mark.parametrize("cfg, rule, tracked, two_sided, keeps_out, projects", [
    (dict(), PerStepSplit(), True, False, False, False),
    (dict(form="per_expert", tracker_iters=2, tracker_oversample=3), PerStepSplit("per_expert", 2, 3),
     True, False, True, True),
    (dict(gradient_split="fixed"), FixedSplit(), False, False, True, True),
    (dict(gradient_split="fixed", form="lowrank"), FixedSplit("lowrank"), False, False, True, True),
    (dict(gradient_split="fixed", projection_sides="two", basis_source="shared"), TwoSidedSplit(),
     False, True, True, True),
    (dict(gradient_split="none"), NoSplit(), False, False, False, False),
    (dict(gradient_split="none", form="lowrank"), NoSplit("lowrank"), False, False, False, True),
])
def test_the_config_names_one_rule_with_its_parameters(cfg, rule, tracked, two_sided, keeps_out, projects):
    got = split_rule(SDMoEConfig(**cfg).validate())
    assert repr(got) == repr(rule)
    assert (got.tracked, got.two_sided, got.keeps_tails_out, got.projects_at_split) == (tracked, two_sided,
                                                                                        keeps_out, projects)


def test_every_layer_asks_the_one_rule():
    ctl = _split_model("qwen3_moe", gradient_split="fixed", projection_sides="two", basis_source="shared")
    assert isinstance(ctl.rule, TwoSidedSplit) and all(layer.rule is ctl.rule for layer in ctl.layers)
    assert all(layer.q_PDX is None and set(layer.basis_f) == set(layer.projs) for layer in ctl.layers)
    assert PerStepSplit(oversample=3).width(8, 10) == 10 and FixedSplit().width(8, 10) == 8
