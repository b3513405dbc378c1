"""The training-time monitor on plain and parametrized experts."""

from torch import nn
from torch.nn.utils import parametrize

from sdmoe.analysis.monitor import spectral_snapshot
from sdmoe.moe import find_moe_blocks


class _Scale(nn.Module):
    def forward(self, w):
        return 2.0 * w


def test_plain_model_params_then_grads(make_model, batches):
    model = make_model()
    snap = spectral_snapshot(model, k=4)
    assert {f"param_overlap/L{l}/{p}" for l in (0, 1) for p in ("gate", "up", "down")} <= set(snap)
    assert snap["overlap_baseline"] == 4 / 32 and not any(k.startswith("grad_") for k in snap)
    model(input_ids=batches[0]).logits.mean().backward()
    snap = spectral_snapshot(model, k=4)
    assert "grad_overlap/L0/gate" in snap and 0 <= snap["grad_overlap/mean"] <= 1


def test_parametrized_experts(make_model):
    model = make_model()
    plain = spectral_snapshot(model, k=4)
    for block in find_moe_blocks(model):
        parametrize.register_parametrization(block.experts, "gate_up_proj", _Scale())
        parametrize.register_parametrization(block.experts, "down_proj", _Scale())
    assert len(find_moe_blocks(model)) == 2
    snap = spectral_snapshot(model, k=4)  # materialised 2W: same subspaces
    for key, v in plain.items():
        assert abs(snap[key] - v) < 1e-5, key
