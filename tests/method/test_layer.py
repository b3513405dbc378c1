"""`LayerState`: one layer's tensors, as its split rule asks, their names for a checkpoint and what `to` moves."""

import pytest

from sdmoe.method import SDMoEConfig
from sdmoe.method.layer import LayerState
from sdmoe.method.split import split_rule
from sdmoe.moe import find_moe_blocks

from .method_helpers import make_model


@pytest.mark.parametrize("cfg, names", [
    (SDMoEConfig(projections=("down", "gate")), {"basis_gate", "basis_down", "q_gate", "q_down", "shared_gate",
                                                 "shared_down"}),
    (SDMoEConfig(gradient_split="fixed", projection_sides="two"),
     {f"{n}_{p}" for n in ("basis", "basis_f", "shared") for p in ("gate", "up", "down")}),
])
def test_the_state_a_checkpoint_holds(cfg, names):
    block = find_moe_blocks(make_model("qwen3_moe"))[0]
    layer = LayerState(block, split_rule(cfg), cfg.projections, rank=4, width=6)
    assert layer.projs == tuple(p for p in ("gate", "up", "down") if p in cfg.projections)  # storage order
    assert set(layer.tensors()) == names
    assert all(t.shape == (block.hidden_size, 6) for t in layer.q.values())
    # every allocated tensor (deltas included) is one `to` moves
    assert {id(t) for t in layer.tensors().values() if t.ndim and t._base is None} <= {id(t) for t in layer.owned()}
