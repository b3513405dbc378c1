"""Bad configurations and unsupported models fail with one-line UserErrors naming what is supported."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sdmoe.errors import UserError
from sdmoe.method import SDMoE, SDMoEConfig
from sdmoe.method.config import upgrade_saved

from .method_helpers import make_model


@pytest.mark.parametrize("cfg,match", [
    (SDMoEConfig(rank=32), r"rank must be in 1\.\.d-1 \(d=32\)"),
    (SDMoEConfig(rank=40), r"rank must be in 1\.\.d-1 \(d=32\)"),
    (SDMoEConfig(rank=-1), r"sdmoe\.rank=-1 is out of range; use an integer >= 0 \(0 = d // 4\)"),
    (SDMoEConfig(rank=[4, -1]), r"sdmoe\.rank=\[4, -1\] is out of range"),
    (SDMoEConfig(rank=4.5), r"sdmoe\.rank takes an integer or a list of integers, got 4\.5"),
    (SDMoEConfig(rank=[4.7, 2.2]), r"sdmoe\.rank\[0\] takes an integer, got 4\.7"),
    (SDMoEConfig(rank=[8, 8, 8]), r"one rank per MoE layer"),
    (SDMoEConfig(rank=[8, 32]), r"rank must be in 1\.\.d-1"),
    (SDMoEConfig(basis_source="svd"), r"unknown basis_source 'svd'; sdmoe\.basis_source must be one of weights, gradients, activations"),
    (SDMoEConfig(form="hybrid"), r"unknown form 'hybrid'; sdmoe\.form must be"),
    (SDMoEConfig(gradient_split="always"), r"unknown gradient_split 'always'; sdmoe\.gradient_split must be one of per_step, fixed, none"),
    (SDMoEConfig(form="diag"), r"sdmoe\.form must be"),
    (SDMoEConfig(projections=("gate", "o_proj")), r"sdmoe\.projections\[1\] must be one of gate, up, down"),
    (SDMoEConfig(projections=()), r"sdmoe\.projections needs at least 1 entry"),
    (SDMoEConfig(projections=("up", "up")), r"sdmoe\.projections lists up twice"),
    (SDMoEConfig(projections="gate"), r"sdmoe\.projections takes a list drawn from gate, up, down, got 'gate'"),
    (SDMoEConfig(form="lowrank", gradient_split="per_step"), r"use form='full' with per_step"),
    (SDMoEConfig(tracker_iters=0), r"sdmoe\.tracker_iters=0 is out of range; use an integer >= 1"),
    (SDMoEConfig(split_step=-1), r"sdmoe\.split_step=-1 is out of range; use an integer >= 0 \(0 = split at once\)"),
    (SDMoEConfig(split_step="5"), r"sdmoe\.split_step takes an integer, got '5'"),  # built in code: no text parsing
    (SDMoEConfig(lr_shared_mult=float("nan")), r"sdmoe\.lr_shared_mult=nan is not a finite number; use a number >= 0"),
    (SDMoEConfig(lr_shared_mult=-1.0), r"sdmoe\.lr_shared_mult=-1\.0 is out of range"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(UserError, match=match) as e:
        SDMoE(make_model("qwen3_moe"), cfg)
    assert "\n" not in str(e.value)


def test_per_expert_with_per_step_is_fine():
    SDMoE(make_model("qwen3_moe"), SDMoEConfig(form="per_expert", gradient_split="per_step"))


def test_rank_zero_means_quarter_of_d():
    assert SDMoE(make_model("qwen3_moe"), SDMoEConfig(rank=0)).ranks == [8, 8]


def test_model_without_moe_layers():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(UserError, match=r"no MoE layers found in LlamaForCausalLM.*gate_up_proj"):
        SDMoE(LlamaForCausalLM(cfg), SDMoEConfig())


def test_unsupported_expert_layout():
    class Block(nn.Module):  # experts as one opaque module: neither fused 3-D tensors nor a ModuleList
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 4, bias=False)
            self.experts = nn.Linear(16, 64)

    model = nn.Sequential(Block())
    with pytest.raises(UserError, match=r"no MoE layers found.*ModuleList of `gate_proj/up_proj/down_proj`"):
        SDMoE(model, SDMoEConfig())


def test_data_bases_need_data():
    with pytest.raises(UserError, match=r"basis_source='activations'.*reference_batch"):
        SDMoE(make_model("qwen3_moe"), SDMoEConfig(basis_source="activations", split_step=0)).split()
    with pytest.raises(UserError, match=r"basis_source='gradients'.*reference_batch"):
        SDMoE(make_model("qwen3_moe"), SDMoEConfig(basis_source="gradients", split_step=0)).split()


@pytest.mark.parametrize("key, off, on", [("lr_tail_mult", 1.0, 0.5), ("tracker_lag", 0, 1),
                                          ("normalize_tail_updates", False, True), ("router_input", "full", "residual")])
def test_a_saved_config_with_a_removed_option(key, off, on):
    """0.2 saved every field: where a removed option was off, the run reads (and trains) the same without it;
    where it was on, the run is refused in one line naming the option and the release that reads it."""
    assert upgrade_saved({"rank": 8, key: off}) == {"rank": 8}
    with pytest.raises(UserError, match=rf"sdmoe\.{key}={on!r}.* sdmoe 0\.2$"):
        upgrade_saved({"rank": 8, key: on})


def test_split_twice_is_an_error():
    ctl = SDMoE(make_model("qwen3_moe"), SDMoEConfig(split_step=0))
    ctl.split()
    with pytest.raises(UserError, match="already split"):
        ctl.split()
    with pytest.raises(UserError, match="already split"):
        SDMoE(ctl.model, SDMoEConfig(split_step=0))
