"""The layout adapters (`sdmoe.moe.adapters`), one case per way of keeping experts: each case is a tiny MoE
block whose forward computes from its own storage the way its library does (torchtitan's GroupedExperts,
OLMo-core's MoEMLP and DroplessMoEMLP, per-expert module lists, transformers' fused experts plain,
transposed and interleaved), and every case goes through the same round trip:

- canonical views read, written back: the host tensors bit-identical;
- other weights written: read back bit-identical, and the block's own forward is the one recomputed from
  them and the router; in-place edits of the views (then commit) land in the host;
- the gradient views are the gradients of that recomputation; `host_parameters` holds what the views show.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.adapters import (
    FusedExperts,
    ModuleListExperts,
    Orientation,
    StackedExperts,
    find_layout,
    router_names,
    saved_layout,
)
from sdmoe.moe.projections import PROJECTIONS

E, D, F_, K = 4, 12, 8, 2  # F_: F is torch.nn.functional


def expert(gate_FD, up_FD, down_DF, x_TD):
    return (F.silu(x_TD @ gate_FD.T) * (x_TD @ up_FD.T)) @ down_DF.T


def routed(router_ED, x_TD):
    """The cases' routing: softmax over the logits, top-K, renormalised."""
    probs, idx_TK = torch.softmax(x_TD @ router_ED.T, dim=-1).topk(K, dim=-1)
    return idx_TK, probs / probs.sum(-1, keepdim=True)


def recomputed(w, router_ED, x_TD):
    """The block's output from canonical weights w = (gate_EFD, up_EFD, down_EDF) and the router alone."""
    idx_TK, weight_TK = routed(router_ED, x_TD)
    out = torch.zeros_like(x_TD)
    for k in range(K):
        for e in idx_TK[:, k].unique().tolist():
            rows = idx_TK[:, k] == e
            out[rows] += weight_TK[rows, k, None] * expert(w[0][e], w[1][e], w[2][e], x_TD[rows])
    return out


class Block(nn.Module):
    """An MoE block: a Linear router `gate` (or `router.gate`, or OLMo-core's flat weight) and experts whose
    `expert(e, x)` computes expert e from the host's storage in the host's own convention."""

    def __init__(self, experts: nn.Module, router: str = "gate"):
        super().__init__()
        self.top_k = K
        if router == "router.gate":  # torchtitan: the Linear beside the experts
            self.router = nn.Module()
            self.router.gate = nn.Linear(D, E, bias=False)
        elif router == "flat":  # OLMo-core's router keeps an E*D weight
            self.router = nn.Module()
            self.router.weight = nn.Parameter(torch.randn(E * D) * 0.3)
        else:
            self.gate = nn.Linear(D, E, bias=False)
        self.experts_at(experts)

    def experts_at(self, experts: nn.Module) -> None:
        self.experts = experts

    def router_weight(self) -> torch.Tensor:
        r = getattr(self, "gate", None) or getattr(self.router, "gate", None)
        return (r.weight if r is not None else self.router.weight).view(E, D)

    def forward(self, x_TD):
        idx_TK, weight_TK = routed(self.router_weight(), x_TD)
        out = torch.zeros_like(x_TD)
        for k in range(K):
            for e in idx_TK[:, k].unique().tolist():
                rows = idx_TK[:, k] == e
                out[rows] += weight_TK[rows, k, None] * self.owner().expert(e, x_TD[rows])
        return out

    def owner(self):
        return self.experts


class GroupedExperts(nn.Module):
    """torchtitan's: w1, w3 (E, F, D) and w2 (E, D, F), `h @ w2[e].T` (0.3 names carry the shapes)."""

    def __init__(self, names=("w1_EFD", "w3_EFD", "w2_EDF")):
        super().__init__()
        self.names = names
        for n, shape in zip(names, ((E, F_, D), (E, F_, D), (E, D, F_))):
            setattr(self, n, nn.Parameter(torch.randn(shape) * 0.3))

    def expert(self, e, x):
        w1, w3, w2 = (getattr(self, n)[e] for n in self.names)
        return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


class OlmoExpertMLP(nn.Module):
    """OLMo-core's MoEMLP (x @ w1[e], w1 viewed (E, D, F)) or, `dropless`, DroplessMoEMLP (its grouped GEMM:
    x @ w1[e]^T, w1 viewed (E, F, D)); both h @ w2[e], w2 viewed (E, F, D). Flat for FSDP."""

    def __init__(self, dropless: bool, ffn: int = F_):
        super().__init__()
        self.num_experts, self.d_model, self.hidden_size, self.dropless = E, D, ffn, dropless
        for n in ("w1", "w3"):
            setattr(self, n, nn.Parameter(torch.randn(E * (ffn if dropless else D), D if dropless else ffn) * 0.3))
        self.w2 = nn.Parameter(torch.randn(E * ffn, D) * 0.3)
        if dropless:
            self.gmm = lambda *a: None  # what tells the two apart where D == F

    def expert(self, e, x):
        f = self.hidden_size
        if self.dropless:
            w1, w3 = (getattr(self, n).view(E, f, D)[e].T for n in ("w1", "w3"))
        else:
            w1, w3 = (getattr(self, n).view(E, D, f)[e] for n in ("w1", "w3"))
        return (F.silu(x @ w1) * (x @ w3)) @ self.w2.view(E, f, D)[e]


class Mlp(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((D, F_), (D, F_), (F_, D))):
            setattr(self, n, nn.Linear(i, o, bias=False))

    def forward(self, x):
        g, u, dn = (getattr(self, n) for n in self.names)
        return dn(F.silu(g(x)) * u(x))


class ListExperts(nn.ModuleList):
    def expert(self, e, x):
        return self[e](x)


class FusedHost(nn.Module):
    """transformers 5's fused experts: gate_up (E, 2F, D) [gate; up] or interleaved, down (E, D, F); transposed,
    (E, D, 2F) and (E, F, D), computed as x @ gate_up[e] (Llama 4, gpt-oss)."""

    def __init__(self, transposed: bool, interleaved: bool):
        super().__init__()
        self.is_transposed, self.is_concatenated = transposed, not interleaved
        self.gate_up_proj = nn.Parameter(torch.randn((E, D, 2 * F_) if transposed else (E, 2 * F_, D)) * 0.3)
        self.down_proj = nn.Parameter(torch.randn((E, F_, D) if transposed else (E, D, F_)) * 0.3)

    def expert(self, e, x):
        gate_up = x @ self.gate_up_proj[e] if self.is_transposed else x @ self.gate_up_proj[e].T
        g, u = (gate_up[:, 0::2], gate_up[:, 1::2]) if not self.is_concatenated else gate_up.chunk(2, dim=-1)
        h = F.silu(g) * u
        return h @ self.down_proj[e] if self.is_transposed else h @ self.down_proj[e].T


class OlmoBlock(Block):
    def experts_at(self, experts):
        self.experts = nn.Module()
        self.experts.mlp = experts

    def owner(self):
        return self.experts.mlp


class TitanBlock(Block):
    def experts_at(self, experts):
        self.routed_experts = nn.Module()
        self.routed_experts.inner_experts = experts

    def owner(self):
        return self.routed_experts.inner_experts


@dataclass
class Case:
    build: object  # () -> nn.Module (the block)
    kind: str  # the layout
    adapter: type
    orientation: tuple = ()  # the host tensors' stored shapes, in letters (fused and stacked)


CASES = {
    "fused": Case(lambda: Block(FusedHost(False, False)), "fused", FusedExperts, ("(E, 2F, D)", "(E, D, F)")),
    "fused_transposed": Case(lambda: Block(FusedHost(True, False)), "fused", FusedExperts,
                             ("(E, D, 2F)", "(E, F, D)")),
    "fused_interleaved": Case(lambda: Block(FusedHost(True, True)), "fused", FusedExperts,
                              ("(E, D, 2F) interleaved", "(E, F, D)")),
    "module_list": Case(lambda: Block(ListExperts([Mlp(("gate_proj", "up_proj", "down_proj")) for _ in range(E)])),
                        "module_list", ModuleListExperts),
    "module_list_w1w3w2": Case(lambda: Block(ListExperts([Mlp(("w1", "w3", "w2")) for _ in range(E)])),
                               "module_list", ModuleListExperts),
    "torchtitan": Case(lambda: TitanBlock(GroupedExperts(), "router.gate"), "stacked", StackedExperts,
                       ("(E, F, D)", "(E, F, D)", "(E, D, F)")),
    "torchtitan_0.2": Case(lambda: Block(GroupedExperts(("w1", "w3", "w2")), "router.gate"), "stacked",
                           StackedExperts, ("(E, F, D)", "(E, F, D)", "(E, D, F)")),
    "olmo_core": Case(lambda: OlmoBlock(OlmoExpertMLP(False), "flat"), "stacked", StackedExperts,
                      ("(E*D, F)", "(E*D, F)", "(E*F, D)")),
    "olmo_core_dropless": Case(lambda: OlmoBlock(OlmoExpertMLP(True), "flat"), "stacked", StackedExperts,
                               ("(E*F, D)", "(E*F, D)", "(E*F, D)")),
    # D == F: the flat shapes are the same for both; only the grouped GEMM says w1 is (E, F, D)
    "olmo_core_square": Case(lambda: OlmoBlock(OlmoExpertMLP(False, ffn=D), "flat"), "stacked", StackedExperts,
                             ("(E*D, F)", "(E*D, F)", "(E*F, D)")),
    "olmo_core_dropless_square": Case(lambda: OlmoBlock(OlmoExpertMLP(True, ffn=D), "flat"), "stacked",
                                      StackedExperts, ("(E*F, D)", "(E*F, D)", "(E*F, D)")),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    c = CASES[request.param]
    module = c.build()
    blocks = find_moe_blocks(module)
    assert len(blocks) == 1
    return c, module, blocks[0]


def canonical_weights(block):
    return block.gate_EFD().detach().clone(), block.up_EFD().detach().clone(), block.down_EDF().detach().clone()


def test_each_layout_is_read_by_its_adapter(case):
    c, module, block = case
    assert block.layout == c.kind and isinstance(block.adapter, c.adapter) and block.module is module
    assert (block.num_experts, block.hidden_size) == (E, D) and block.expert_ffn in (F_, D)
    assert tuple(str(o) for o in getattr(block.adapter, "orientation", {}).values()) == c.orientation
    torch.testing.assert_close(block.router_ED(), module.router_weight(), rtol=0, atol=0)
    assert block.router_ED().data_ptr() == module.router_weight().data_ptr()  # the router's own weight


def test_read_then_written_back_leaves_the_host_bit_identical(case):
    _, _, block = case
    before = [p.detach().clone() for p in block.host_parameters()]
    gate, up, down = canonical_weights(block)
    block.write(gate, up, down)
    assert all(torch.equal(p, b) for p, b in zip(block.host_parameters(), before))
    # written otherwise, then back: read back bit for bit each time
    g = torch.Generator().manual_seed(1)
    new = [torch.randn(w.shape, generator=g) for w in (gate, up, down)]
    block.write(*new)
    assert all(torch.equal(a, b) for a, b in zip(canonical_weights(block), new))
    assert not any(torch.equal(p, b) for p, b in zip(block.host_parameters(), before))
    block.write(gate, up, down)
    assert all(torch.equal(p, b) for p, b in zip(block.host_parameters(), before))


def test_the_block_computes_with_what_was_written(case):
    _, module, block = case
    x_TD = torch.randn(9, D)
    with torch.no_grad():
        torch.testing.assert_close(module(x_TD), recomputed(canonical_weights(block), block.router_ED(), x_TD),
                                   rtol=1e-5, atol=1e-5)
        g = torch.Generator().manual_seed(2)
        new = [torch.randn(w.shape, generator=g) * 0.3 for w in canonical_weights(block)]
        block.write(*new)
        torch.testing.assert_close(module(x_TD), recomputed(new, block.router_ED(), x_TD), rtol=1e-5, atol=1e-5)


def test_view_edits_and_commit_land_in_the_host(case):
    _, _, block = case
    gate, up, down = canonical_weights(block)
    for p, scale in zip(PROJECTIONS, (2.0, 3.0, 0.5)):
        views, commit = block.views("data", (p,))
        assert set(views) == {p}
        views[p].mul_(scale)
        commit()
    torch.testing.assert_close(block.gate_EFD(), 2 * gate, rtol=0, atol=0)
    torch.testing.assert_close(block.up_EFD(), 3 * up, rtol=0, atol=0)
    torch.testing.assert_close(block.down_EDF(), 0.5 * down, rtol=0, atol=0)


def test_gradient_views_are_the_gradients_of_the_recomputation(case):
    _, module, block = case
    assert block.canonical("grad") == {}  # no backward yet
    x_TD = torch.randn(9, D)
    module(x_TD).pow(2).sum().backward()
    leaves = [w.requires_grad_(True) for w in canonical_weights(block)]
    recomputed(leaves, block.router_ED().detach(), x_TD).pow(2).sum().backward()
    grads = block.canonical("grad")
    for p, leaf in zip(PROJECTIONS, leaves):
        want = leaf.grad.transpose(1, 2) if p == "down" else leaf.grad  # canonical: hidden space last
        torch.testing.assert_close(grads[p], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", PROJECTIONS)
def test_host_parameters_hold_what_the_views_show(case, p):
    _, module, block = case
    held = block.host_parameters((p,))
    assert held and len({id(t) for t in held}) == len(held)  # each once
    assert {id(t) for t in block.host_parameters()} == {id(t) for q in PROJECTIONS for t in block.host_parameters((q,))}
    before = {id(t): t.detach().clone() for t in module.parameters()}
    views, commit = block.views("data", (p,))
    views[p].add_(1.0)
    commit()
    changed = {id(t) for t in module.parameters() if not torch.equal(t, before[id(t)])}
    assert changed == {id(t) for t in held}


def test_orientations_read_their_storage_as_the_canonical_shape():
    t = torch.arange(2 * 6 * 5.0).view(2, 6, 5)  # (E, 2F, D), F = 3
    gate, up = Orientation(pair="halves").canonical(t, 3, 5)
    assert torch.equal(gate, t[:, :3]) and torch.equal(up, t[:, 3:])
    gate, up = Orientation(pair="interleaved").canonical(t, 3, 5)
    assert torch.equal(gate, t[:, 0::2]) and torch.equal(up, t[:, 1::2])
    (down,) = Orientation(hidden_last=False).canonical(t.mT, 6, 5)
    assert torch.equal(down, t) and down.data_ptr() == t.data_ptr()
    flat = torch.arange(2 * 3 * 5.0).view(6, 5)  # (E*F, D) and a shard of whole experts of it
    assert torch.equal(Orientation(flat=True).canonical(flat, 3, 5)[0], flat.view(2, 3, 5))
    assert Orientation(flat=True).canonical(flat[3:], 3, 5)[0].shape == (1, 3, 5)
    assert Orientation(False, flat=True).shape(2, 3, 5) == (10, 3)


def test_fused_shapes_decide_transposition_even_where_d_equals_f():
    assert FusedExperts.fit((4, 128, 64), (4, 64, 64)) == (False, 4, 64, 64)  # gate_up (E, 2F, D)
    assert FusedExperts.fit((4, 64, 128), (4, 64, 64)) == (True, 4, 64, 64)  # gpt-oss: (E, D, 2F), (E, F, D)
    assert FusedExperts.fit((4, 32, 64), (4, 64, 32)) is None  # JetMoE's attention experts: not a gated pair
    assert FusedExperts.fit((4, 64), (4, 64, 32)) is None


def test_a_checkpoints_names_are_the_adapters_names():
    # the names under a block a checkpoint keeps, with a key for each: the adapters read the same tensors
    names = {"experts.gate_up_proj": "k1", "experts.down_proj": "k2"}
    shapes = {"k1": (4, 64, 128), "k2": (4, 64, 64), "r": (4, 64)}
    fused = saved_layout(names, shapes.get, "gpt_oss", 4)
    assert isinstance(fused, FusedExperts) and fused.transposed and fused.interleaved
    assert not saved_layout(names, shapes.get, "llama4_text", 4).interleaved
    listed = {f"experts.{i}.{n}.weight": f"{i}{n}" for i in range(2) for n in ("w1", "w3", "w2")}
    shapes = {k: ((8, 12) if k[1:] != "w2" else (12, 8)) for k in listed.values()}
    got = saved_layout(listed, shapes.get, None, None)
    assert isinstance(got, ModuleListExperts) and got.places["down"] == ["0w2", "1w2"]
    with pytest.raises(UserError, match="incomplete"):
        saved_layout({k: v for k, v in listed.items() if not k.startswith("experts.1.w3")}, shapes.get, None, None)
    dbrx = {f"experts.mlp.{n}": n for n in ("w1", "v1", "w2")}
    got = saved_layout(dbrx, lambda k: (4 * 8, 12), "dbrx", 4)  # E from the router's rows
    assert isinstance(got, StackedExperts) and (got.num_experts, got.expert_ffn, got.hidden_size) == (4, 8, 12)
    assert saved_layout(dbrx, lambda k: (4 * 8, 12), "dbrx", None) is None  # flat: no router, no E
    assert router_names()[:2] == ("gate.weight", "router.weight") and "router.layer.weight" in router_names()


def test_an_unread_block_is_found_by_no_adapter_and_refused_in_one_line():
    module = Block(ListExperts([nn.Sequential(nn.Linear(D, F_), nn.Linear(F_, D)) for _ in range(E)]))
    assert find_layout(module) is None
    with pytest.raises(UserError, match="no MoE layers found") as e:
        find_moe_blocks(module)
    assert "\n" not in str(e.value) and "sdmoe needs routed experts stored as fused 3-D" in str(e.value)
