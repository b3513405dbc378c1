"""`sdmoe.moe.layout` on every MoE family of the installed transformers (`sdmoe.moe.families`), through
the layout adapters (`sdmoe.moe.adapters`; tests/moe/test_adapters.py has one case per way of keeping
experts), and in detail on the families whose experts or router sit apart from transformers 5's usual
`experts.gate_up_proj` + `gate`: Llama 4 (transposed storage without the flags, a router returning
(scores, logits)), HunYuan (router weight in `gate.wg`), JetMoE (the block's own `input_linear` /
`output_linear`, a router returning its dispatch plan) and DBRX (flat `w1/v1/w2`, router `router.layer`).

Every family: canonical views read and written back leave the host tensors bit-identical; other weights
written are read back bit for bit and the family's own experts compute with them (its experts module's
forward, or the block's for the families above, recomputed from the canonical views and the router); what
`save_pretrained` writes is read back by `ExpertCheckpoint` bit for bit (a few families in the default
tier, every family in the slow one). The four above: each block's output is recomputed from the
canonical views and the router weight alone, the gradients of that recomputation are the canonical
gradient views, and the router's forward hooks see (logits, scores, indices)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdmoe.moe import find_moe_blocks
from sdmoe.moe.checkpoint import ExpertCheckpoint
from sdmoe.moe.families import build_tiny, moe_model_types
from sdmoe.moe.layout import RouterAdapter

from .family_chain import REFUSED


def expert(gate_FD, up_FD, down_DF, x_TD):
    return (F.silu(x_TD @ gate_FD.T) * (x_TD @ up_FD.T)) @ down_DF.T


def mixture(w, x_TD, idx_TK, weight_TK):
    """sum_k weight_k * expert_{idx_k}(x), from canonical weights w = (gate_EFD, up_EFD, down_EDF)."""
    out = torch.zeros_like(x_TD)
    for k in range(idx_TK.shape[1]):
        for e in idx_TK[:, k].unique().tolist():
            rows = idx_TK[:, k] == e
            out[rows] += weight_TK[rows, k, None] * expert(w[0][e], w[1][e], w[2][e], x_TD[rows])
    return out


def llama4(block, w, router_ED, x_TD):
    # sigmoid of the top-k logits scales each chosen expert's INPUT; every token also takes the shared expert
    top, idx = (x_TD @ router_ED.T).topk(block.module.top_k, dim=-1)
    out = block.module.shared_expert(x_TD)
    for k in range(idx.shape[1]):
        for e in idx[:, k].unique().tolist():
            rows = idx[:, k] == e
            out[rows] += expert(w[0][e], w[1][e], w[2][e], x_TD[rows] * torch.sigmoid(top[rows, k, None]))
    return out


def hunyuan(block, w, router_ED, x_TD):
    probs, idx = torch.softmax(x_TD @ router_ED.T, dim=-1).topk(block.router.top_k, dim=-1)
    return block.module.shared_mlp(x_TD) + mixture(w, x_TD, idx, probs / probs.sum(-1, keepdim=True))


def jetmoe(block, w, router_ED, x_TD):
    top, idx = (x_TD @ router_ED.T).topk(block.router.top_k, dim=-1)
    return mixture(w, x_TD, idx, torch.softmax(top, dim=-1)) + block.module.bias


def dbrx(block, w, router_ED, x_TD):
    probs, idx = torch.softmax(x_TD @ router_ED.T, dim=-1).topk(block.module.top_k, dim=-1)
    return mixture(w, x_TD, idx, probs / probs.abs().sum(-1, keepdim=True))  # p-norm 1 (its default)


FAMILIES = {"llama4_text": (llama4, "fused"), "hunyuan_v1_moe": (hunyuan, "fused"), "jetmoe": (jetmoe, "fused"),
            "dbrx": (dbrx, "stacked")}


def block_output(block, x_BSD):
    out = block.module(x_BSD)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x_BSD.shape[-1])


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model = build_tiny(request.param).float()
    return request.param, model, find_moe_blocks(model)[0]


def test_block_output_is_recomputed_from_the_canonical_views(family):
    name, _, block = family
    reference, layout = FAMILIES[name]
    assert block.layout == layout and (block.num_experts, block.hidden_size) == (4, 64)
    x_BSD = torch.randn(2, 5, block.hidden_size)
    with torch.no_grad():
        w = (block.gate_EFD(), block.up_EFD(), block.down_EDF())
        expected = reference(block, w, block.router_ED(), x_BSD.reshape(-1, block.hidden_size))
        torch.testing.assert_close(block_output(block, x_BSD), expected, rtol=1e-5, atol=1e-5)


def test_gradient_views_are_the_gradients_of_the_recomputation(family):
    name, _, block = family
    reference = FAMILIES[name][0]
    x_BSD = torch.randn(2, 5, block.hidden_size)
    block_output(block, x_BSD).pow(2).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (block.gate_EFD(), block.up_EFD(), block.down_EDF())]
    reference(block, leaves, block.router_ED().detach(), x_BSD.reshape(-1, block.hidden_size)).pow(2).sum().backward()
    grads = block.canonical("grad")
    for p, leaf in zip(("gate", "up", "down"), leaves):
        want = leaf.grad.transpose(1, 2) if p == "down" else leaf.grad  # canonical: hidden space last
        torch.testing.assert_close(grads[p], want, rtol=1e-4, atol=1e-6)


def test_written_weights_are_the_ones_the_host_computes_with(family):
    name, _, block = family
    reference = FAMILIES[name][0]
    e, f, d = block.num_experts, block.expert_ffn, block.hidden_size
    g = torch.Generator().manual_seed(1)
    new = (torch.randn(e, f, d, generator=g), torch.randn(e, f, d, generator=g), torch.randn(e, d, f, generator=g))
    block.write(*new)
    for got, want in zip((block.gate_EFD(), block.up_EFD(), block.down_EDF()), new):
        assert torch.equal(got, want)
    x_BSD = torch.randn(2, 5, d)
    with torch.no_grad():
        expected = reference(block, new, block.router_ED(), x_BSD.reshape(-1, d))
        torch.testing.assert_close(block_output(block, x_BSD), expected, rtol=1e-4, atol=1e-4)
    # views alias the storage: an in-place edit of one is the host's weight
    views, commit = block.views()
    views["up"].mul_(2)
    commit()
    assert torch.equal(block.up_EFD(), 2 * new[1])


def test_router_hooks_see_logits_scores_and_indices(family):
    _, _, block = family
    seen, inputs = [], []
    handles = [block.router.register_forward_hook(lambda m, a, out: seen.append(out)),
               block.router.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))]
    x_BSD = torch.randn(2, 5, block.hidden_size)
    with torch.no_grad():
        block_output(block, x_BSD)
    for h in handles:
        h.remove()
    logits, _, indices = seen[0]
    x_TD = x_BSD.reshape(-1, block.hidden_size)
    assert torch.allclose(inputs[0].reshape(-1, block.hidden_size).float(), x_TD)  # the layer's input
    torch.testing.assert_close(logits.float(), x_TD @ block.router_ED().T, rtol=1e-5, atol=1e-5)
    assert not indices.is_floating_point() and indices.shape[0] == x_TD.shape[0]
    chosen = (x_TD @ block.router_ED().T).topk(indices.shape[1], dim=-1).indices
    assert torch.equal(indices.sort(-1).values, chosen.sort(-1).values)


def test_adapted_routers_share_the_routing_modules_weight_and_attributes():
    model = build_tiny("hunyuan_v1_moe")
    block = find_moe_blocks(model)[0]
    assert isinstance(block.router, RouterAdapter)
    assert block.router.weight is block.module.gate.wg.weight
    assert block.router.top_k == block.module.gate.top_k
    assert getattr(block.router, "e_score_correction_bias", None) is None  # what the routing module lacks
    assert {id(p) for p in block.host_parameters()} == {id(block.module.experts.gate_up_proj),
                                                         id(block.module.experts.down_proj)}


@pytest.mark.parametrize("name", ["llama4_text", "hunyuan_v1_moe", "jetmoe", "gpt_oss"])
def test_weights_only_reading_matches_the_live_views(name, tmp_path):
    # expert width 48 != hidden 64, as in the released checkpoints: the files' shapes alone say which is which
    # (where they are equal the reader goes by model type: the slow tests/moe/test_families.py covers that)
    model = build_tiny(name, intermediate_size=48)
    model.save_pretrained(tmp_path)
    blocks = find_moe_blocks(model)
    with ExpertCheckpoint(tmp_path) as ckpt:
        assert ckpt.layers == [b.layer for b in blocks]
        assert (ckpt.num_experts, ckpt.hidden_size, ckpt.expert_ffn) == (4, 64, 48) == (
            blocks[0].num_experts, blocks[0].hidden_size, blocks[0].expert_ffn)
        for block in blocks:
            lw = ckpt.read_layer(block.layer)
            assert torch.equal(lw.gate_EFD, block.gate_EFD()) and torch.equal(lw.up_EFD, block.up_EFD())
            assert torch.equal(lw.down_EDF, block.down_EDF())
            assert lw.router_ED is not None and torch.equal(lw.router_ED, block.router_ED())


# -- every family ------------------------------------------------------------------------------------------------
READ = [t for t in moe_model_types() if t not in REFUSED]
# Families whose experts module has no `experts(x, top_k_index, top_k_weights)` forward of its own: the block's
# output is recomputed instead (the references above).
BLOCK_LEVEL = {"llama4_text": llama4, "jetmoe": jetmoe, "dbrx": dbrx}
# gpt-oss's gate reads the gate and up outputs interleaved, [g0, u0, g1, u1, ...], the order it stores them in
GATE_INTERLEAVED = {"gpt_oss"}
# Families whose checkpoints are read back in the default tier: one of each layout and storage the adapters
# tell apart (every family in the slow tier)
SAVED_FAST = {"aria_text", "dbrx", "gpt_oss", "granitemoe", "inkling2_text", "jetmoe", "llama4_text", "mixtral",
              "qwen3_moe", "hunyuan_v1_moe"}


def canonical_weights(block):
    return tuple(t.detach().clone() for t in (block.gate_EFD(), block.up_EFD(), block.down_EDF()))


def gated(experts, model_type, g_TF, u_TF):
    """The family's own gated activation of the gate and up outputs (`_apply_gate`, else act_fn(g) * u)."""
    if not hasattr(experts, "_apply_gate"):
        return experts.act_fn(g_TF) * u_TF
    interleaved = model_type in GATE_INTERLEAVED
    return experts._apply_gate(torch.stack((g_TF, u_TF), -1).flatten(-2) if interleaved else torch.cat((g_TF, u_TF), -1))


def experts_output(experts, model_type, w, x_TD, idx_TK, weight_TK):
    """sum_k weight_k * expert_{idx_k}(x) from canonical weights w, with the family's own gate."""
    out = torch.zeros_like(x_TD)
    for k in range(idx_TK.shape[1]):
        for e in idx_TK[:, k].unique().tolist():
            rows = idx_TK[:, k] == e
            h = gated(experts, model_type, x_TD[rows] @ w[0][e].T, x_TD[rows] @ w[1][e].T)
            out[rows] += weight_TK[rows, k, None] * (h @ w[2][e].T)
    return out


def assert_computes_with(block, model_type, w):
    """The family's own forward (its experts', or its block's) is the one recomputed from canonical weights w."""
    x_TD = torch.randn(6, block.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, p in block.experts.named_parameters():
            if name.endswith("_bias"):  # gpt-oss' expert biases: not weights the views hold
                p.zero_()
        if model_type in BLOCK_LEVEL:
            want = BLOCK_LEVEL[model_type](block, w, block.router_ED(), x_TD)
            got = block_output(block, x_TD[None])
        else:
            g = torch.Generator().manual_seed(4)
            idx_TK = torch.stack([torch.randperm(block.num_experts, generator=g)[:2] for _ in range(6)])
            weight_TK = torch.rand(6, 2, generator=g)
            got = block.experts(x_TD, idx_TK, weight_TK)
            got = got[0] if isinstance(got, tuple) else got
            want = experts_output(block.experts, model_type, w, x_TD, idx_TK, weight_TK)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", READ)
def test_every_family_round_trips_its_canonical_views(model_type):
    model = build_tiny(model_type).float()
    blocks = find_moe_blocks(model)
    g = torch.Generator().manual_seed(2)
    for block in blocks:
        before = [p.detach().clone() for p in block.host_parameters()]
        w = canonical_weights(block)
        block.write(*w)  # read, written back: the host bit for bit
        assert all(torch.equal(p, b) for p, b in zip(block.host_parameters(), before))
        new = tuple(torch.randn(t.shape, generator=g) * 0.2 for t in w)
        block.write(*new)
        assert all(torch.equal(a, b) for a, b in zip(canonical_weights(block), new))
        assert_computes_with(block, model_type, new)
        block.write(*w)
        assert all(torch.equal(p, b) for p, b in zip(block.host_parameters(), before))


@pytest.mark.parametrize("model_type", [t if t in SAVED_FAST else pytest.param(t, marks=pytest.mark.slow) for t in READ])
def test_every_familys_saved_experts_are_read_as_its_live_views(model_type, tmp_path):
    model = build_tiny(model_type).float()
    model.save_pretrained(tmp_path)
    blocks = find_moe_blocks(model)
    with ExpertCheckpoint(tmp_path) as ckpt:
        assert ckpt.layers == [b.layer for b in blocks]
        assert (ckpt.num_experts, ckpt.hidden_size, ckpt.expert_ffn) == (
            blocks[0].num_experts, blocks[0].hidden_size, blocks[0].expert_ffn)
        for block in blocks:
            for dtype in (None, torch.float64):  # views of the tensors read; one converted copy each
                lw = ckpt.read_layer(block.layer, dtype)
                for got, live in zip((lw.gate_EFD, lw.up_EFD, lw.down_EDF, lw.router_ED),
                                     (block.gate_EFD(), block.up_EFD(), block.down_EDF(), block.router_ED())):
                    assert got is not None and torch.equal(got, live.detach().to(got.dtype))
