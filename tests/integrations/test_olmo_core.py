"""OLMo-core's own MoE modules (`olmo_core.nn.moe`: MoE / DroplessMoE with MoELinearRouter and MoEMLP /
DroplessMoEMLP) on CPU, with SD-MoE through `sdmoe.integrations.olmo_core.SDMoEOlmoCoreCallback`.

OLMo-core's MoE forward stops on CPU at `olmo_core.ops.moe.gather` / `binned_gather` (they assert
`olmo_core.kernels.moe`, which imports Triton and runs on CUDA). So the model here runs their router
and their expert MLP modules (`experts.mlp`, whose w1/w2/w3 hold the weights) with a plain per-expert
dispatch; the callback is driven in the order of OLMo-core's `Trainer._fit_epoch`."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("olmo_core.nn.moe", reason='needs the OLMo-core extra: pip install "sdmoe[olmo-core]"')

from olmo_core.nn.moe import MoEConfig, MoEType  # noqa: E402
from olmo_core.nn.moe.router import MoERouterConfig  # noqa: E402

from sdmoe.errors import UserError  # noqa: E402
from sdmoe.integrations.olmo_core import SDMoEOlmoCoreCallback  # noqa: E402
from sdmoe.method import SDMoEConfig  # noqa: E402
from sdmoe.moe import find_moe_blocks  # noqa: E402

from .stack_helpers import (  # noqa: E402
    LR,
    MAX_NORM,
    WD,
    assert_same_weights,
    loss_of,
    own_loop,
    tails_orthogonality,
    tokens,
    twin,
)

V, D, F, E, K = 64, 16, 24, 4, 2


class TinyOLMo(nn.Module):
    """Embedding -> two of OLMo-core's MoE blocks (residual) -> head, under `blocks` as in its Transformer."""

    def __init__(self, kind: MoEType, seed: int = 0, ffn: int = F):
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.Embedding(V, D)
        self.blocks = nn.ModuleDict({str(i): nn.ModuleDict({"feed_forward_moe": MoEConfig(
            name=kind, num_experts=E, hidden_size=ffn, router=MoERouterConfig(top_k=K),
            lb_loss_weight=None, z_loss_weight=None).build(d_model=D)}) for i in range(2)})
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, ids_BT):
        x_BTD = self.embeddings(ids_BT)
        for block in self.blocks.values():
            x_BTD = x_BTD + _moe_cpu(block["feed_forward_moe"], x_BTD)
        return self.lm_head(x_BTD)


def _moe_cpu(moe, x_BTD):
    """Their router and their expert MLP, with a per-expert dispatch in place of their Triton gather/scatter."""
    weights_NK, experts_NK, _, _ = moe.router(x_BTD)
    x_ND = x_BTD.flatten(0, 1)
    weights_NK, experts_NK = weights_NK.flatten(0, 1), experts_NK.flatten(0, 1)
    out_ND = torch.zeros_like(x_ND)
    mlp = moe.experts.mlp
    for e in range(E):
        rows_N, slot_N = (experts_NK == e).nonzero(as_tuple=True)
        if type(mlp).__name__ == "DroplessMoEMLP":  # (tokens sorted by expert, tokens per expert)
            sizes_E = torch.zeros(E, dtype=torch.long)
            sizes_E[e] = len(rows_N)
            y = mlp(x_ND[rows_N], sizes_E)
        else:  # MoEMLP: (E, capacity, D) -- expert e's tokens, the others' slots empty
            x_ECD = torch.zeros(E, len(rows_N), D)
            x_ECD[e] = x_ND[rows_N]
            y = mlp(x_ECD)[e]
        out_ND = out_ND.index_add(0, rows_N, y * weights_NK[rows_N, slot_N, None])
    return out_ND.view_as(x_BTD)


class _Trainer(SimpleNamespace):
    """The attributes of OLMo-core's Trainer the callback reads, around their modules and a torch AdamW."""

    def __init__(self, model):
        optim = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD,
                                  foreach=True)
        super().__init__(global_step=0, metrics={},
                         train_module=SimpleNamespace(model=model, optim=optim, max_grad_norm=MAX_NORM))

    def record_metric(self, name, value, reduce_type=None, namespace=None):
        self.metrics[(self.global_step, f"{namespace}/{name}")] = float(value)


def _fit(trainer, cb, batches):
    """OLMo-core's `_fit_epoch`, in order (the train module's optim_step clips when max_grad_norm is set)."""
    tm = trainer.train_module
    for ids in batches:
        trainer.global_step += 1
        cb.pre_step({"input_ids": ids})
        loss_of(tm.model, ids).backward()
        cb.pre_optim_step()
        if tm.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(tm.model.parameters(), tm.max_grad_norm)
        tm.optim.step()
        tm.optim.zero_grad(set_to_none=True)
        cb.post_train_batch()


def _callback(model, cfg, **kw):
    cb = SDMoEOlmoCoreCallback(cfg=cfg, **kw)
    cb.trainer = _Trainer(model)
    cb.pre_train()
    return cb


@pytest.mark.parametrize("kind", [MoEType.default, MoEType.dropless])
def test_layout_of_their_expert_mlps(kind):
    model = TinyOLMo(kind)
    b = find_moe_blocks(model)[0]
    mlp = model.blocks["0"]["feed_forward_moe"].experts.mlp
    assert (b.layout, b.num_experts, b.hidden_size, b.expert_ffn) == ("stacked", E, D, F) and b.experts is mlp
    x_3D, h_3F = torch.randn(3, D), torch.randn(3, F)
    # the canonical views compute what their forward computes with w1 and w2 (MoEMLP: x @ w1[e];
    # DroplessMoEMLP: x @ w1[e]^T; both h @ w2[e] with w2 viewed (E, F, D))
    w1 = mlp.w1.view(E, D, F)[2] if kind == MoEType.default else mlp.w1.view(E, F, D)[2].T
    torch.testing.assert_close(x_3D @ b.gate_EFD()[2].T, x_3D @ w1)
    torch.testing.assert_close(h_3F @ b.down_EDF()[2].T, h_3F @ mlp.w2.view(E, F, D)[2])
    torch.testing.assert_close(b.router_ED(), model.blocks["0"]["feed_forward_moe"].router.weight.view(E, D))
    views, _ = b.views("data")
    assert all(v.data_ptr() == getattr(mlp, n).data_ptr() for v, n in zip(views.values(), ("w1", "w3", "w2")))


def test_square_experts_told_apart_by_their_grouped_gemm():
    """D == F: the flattened shapes are the same for both MLPs; the layout still reads each correctly."""
    for kind in (MoEType.default, MoEType.dropless):
        model = TinyOLMo(kind, ffn=D)
        b = find_moe_blocks(model)[0]
        mlp = b.experts
        x_3D = torch.randn(3, D)
        w1 = mlp.w1.view(E, D, D)[1] if kind == MoEType.default else mlp.w1.view(E, D, D)[1].T
        torch.testing.assert_close(x_3D @ b.gate_EFD()[1].T, x_3D @ w1)


@pytest.mark.parametrize("kind,split", [(MoEType.dropless, "per_step"), (MoEType.default, "fixed")])
def test_callback_matches_our_loop(kind, split):
    cfg = SDMoEConfig(split_step=2, gradient_split=split, rank=4)
    batches = tokens(V, 6)
    ours = TinyOLMo(kind)
    theirs = twin(ours)
    ref = own_loop(ours, cfg, batches)

    cb = _callback(theirs, cfg, monitor_every=3)
    assert cb.trainer.train_module.max_grad_norm is None  # the clip is the callback's now
    _fit(cb.trainer, cb, batches)
    assert_same_weights(theirs, ours)
    for a, b in zip(cb.controller.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if split == "fixed":
        assert tails_orthogonality(cb.controller) < 1e-5
    m = cb.trainer.metrics
    assert m[(3, "sdmoe/split_at")] == 2.0 and m[(6, "optim/total grad norm")] > MAX_NORM
    assert 0 <= m[(6, "sdmoe/param_overlap/mean")] <= 1
    cb.post_train()
    assert cb.trainer.train_module.max_grad_norm == MAX_NORM  # handed back


def test_resume_through_the_trainer_state(tmp_path):
    """OLMo-core saves callbacks' state with torch.save in the trainer state, loads the model and optimizer
    first, then the callbacks, then calls pre_train: the resumed run continues exactly."""
    cfg = SDMoEConfig(split_step=1, gradient_split="per_step", rank=4)
    batches = tokens(V, 5)
    model = TinyOLMo(MoEType.dropless)
    cb = _callback(model, cfg)
    _fit(cb.trainer, cb, batches[:3])
    torch.save({"callbacks": {"sdmoe": cb.state_dict()}, "model": model.state_dict(),
                "optim": cb.trainer.train_module.optim.state_dict()}, tmp_path / "rank0.pt")
    _fit(cb.trainer, cb, batches[3:])

    ck = torch.load(tmp_path / "rank0.pt", weights_only=False)
    fresh = TinyOLMo(MoEType.dropless, seed=1)
    fresh_cb = SDMoEOlmoCoreCallback(cfg=cfg)
    fresh_cb.trainer = _Trainer(fresh)
    fresh.load_state_dict(ck["model"])
    fresh_cb.trainer.train_module.optim.load_state_dict(ck["optim"])
    fresh_cb.load_state_dict(ck["callbacks"]["sdmoe"])
    fresh_cb.pre_train()
    fresh_cb.trainer.global_step = 3
    _fit(fresh_cb.trainer, fresh_cb, batches[3:])
    assert_same_weights(fresh, model)


def test_refuses_what_it_cannot_do():
    from olmo_core.optim import SkipStepAdamW

    model = TinyOLMo(MoEType.dropless)
    cb = SDMoEOlmoCoreCallback(cfg=SDMoEConfig(split_step=0, rank=4))
    cb.trainer = _Trainer(model)
    cb.trainer.train_module.optim = SkipStepAdamW(model.parameters(), lr=LR)
    with pytest.raises(UserError, match="AdamWConfig"):
        cb.pre_train()  # before anything is attached
