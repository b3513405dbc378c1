"""`ChangeProbe`: the change a split makes, per block and in the logits."""

import torch

from sdmoe.method.probe import ChangeProbe
from sdmoe.moe import find_moe_blocks

from .method_helpers import batch, make_model


def test_no_change_reads_zero_and_a_change_reads_its_size():
    model = make_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    probe = ChangeProbe(model, blocks, batch(0))
    record = {"layers": [{} for _ in blocks]}
    probe.record(record)
    assert record["logits_rel_change"] == 0.0 and all(r["rel_change"] == 0.0 for r in record["layers"])
    with torch.no_grad():
        blocks[1].views("data", ("down",))[0]["down"].mul_(1.5)  # only the second block's experts change
    changes, logits = probe.changes()
    assert changes[0] == 0.0 and changes[1] > 1e-3 and logits > 0
