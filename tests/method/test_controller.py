"""The controller: the gradient split, the shared update, the tail invariant, optimizer binding, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from sdmoe.method import SDMoE, SDMoEConfig, convert
from sdmoe.moe import find_moe_blocks

from .method_helpers import batch, lm_loss, make_model

KINDS = ("qwen3_moe", "module_list")


def _rel_in(t_EFD, u_DR):
    """||T U||_F / ||T||_F."""
    return float((t_EFD @ u_DR).norm() / t_EFD.norm())


def _steps(model, ctl, opt, steps, ref=None, clip=1.0):
    losses = []
    for step in steps:
        ctl.before_forward(step, opt, ref)
        loss = lm_loss(model, batch(step))
        loss.backward()
        ctl.after_backward(step)
        ctl.clip_grad_norm_(clip)
        opt.step()
        ctl.after_optimizer_step(step, ref)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["full", "lowrank", "per_expert"])
def test_fixed_split_keeps_tails_out_of_u(kind, form):
    model = make_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl = SDMoE(model, SDMoEConfig(form=form, gradient_split="fixed", split_step=0, rank=8))
    _steps(model, ctl, opt, range(30))
    for li, layer in enumerate(ctl.layers):
        tails = ctl.tails(li)
        assert set(tails) == {"gate", "up", "down"}
        for p, t in tails.items():
            assert t.norm() > 0
            assert _rel_in(t, layer.basis[p]) <= 1e-5


def _plain_grads(model, ids):
    """G_i = dL/dW_i of the same model (it is a plain model), canonical E x F x D per layer."""
    plain = copy.deepcopy(model)
    lm_loss(plain, ids).backward()
    return [{p: g.clone() for p, g in b.canonical("grad").items()} for b in find_moe_blocks(plain)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", ["per_step", "fixed", "none"])
def test_full_form_shared_gradient_and_tails(kind, split):
    """per_step/fixed: shared gets (sum_i G_i) QQ^T, tails G_i (I - QQ^T); none (the control): the plain ones."""
    model, ids = make_model(kind), batch()
    ctl = convert(model, SDMoEConfig(gradient_split=split, rank=8))
    g_plain = _plain_grads(model, ids)
    lm_loss(model, ids).backward()
    ctl.after_backward(0)
    for li, (layer, g) in enumerate(zip(ctl.layers, g_plain)):
        tails = layer.block.canonical("grad")
        for p in ("gate", "up", "down"):
            gsum = g[p].sum(0)
            if split == "none":
                assert torch.allclose(layer.delta[p].grad, gsum, atol=1e-6, rtol=1e-4)
                assert torch.allclose(tails[p], g[p], atol=1e-6, rtol=1e-4)
                continue
            q = layer.q[p][:, : layer.r] if split == "per_step" else layer.basis[p]
            assert torch.allclose(layer.delta[p].grad, gsum @ q @ q.T, atol=1e-6, rtol=1e-4)
            assert float((tails[p] @ q).norm()) <= 1e-5 * float(tails[p].norm())
            assert torch.allclose(tails[p], g[p] - g[p] @ q @ q.T, atol=1e-6, rtol=1e-4)
            # the two parts add up to the whole gradient
            assert torch.allclose(tails[p].sum(0) + layer.delta[p].grad, gsum, atol=1e-5, rtol=1e-4)
            if split == "per_step":  # Q is the tracked top-r subspace of the gradients: it holds much of their energy
                assert (g[p] @ q).square().sum() / g[p].square().sum() > 8 / 32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["lowrank", "per_expert"])
def test_lowrank_forms_take_the_gradient_inside_u(kind, form):
    model, ids = make_model(kind), batch()
    ctl = convert(model, SDMoEConfig(form=form, gradient_split="fixed", rank=6))
    g_plain = _plain_grads(model, ids)
    lm_loss(model, ids).backward()
    ctl.after_backward(0)
    for layer, g in zip(ctl.layers, g_plain):
        for p in ("gate", "up", "down"):
            u = layer.basis[p]
            want = g[p] @ u if form == "per_expert" else g[p].sum(0) @ u  # A_i's: G_i U; A's: sum_i G_i U
            assert torch.allclose(layer.delta[p].grad, want, atol=1e-6, rtol=1e-4)


def test_the_model_stays_plain():
    """No module, parameter or buffer is added; the state dict keeps its keys; a mid-run copy is a plain model."""
    model = make_model("qwen2_moe")
    keys = set(model.state_dict())
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctl = SDMoE(model, SDMoEConfig(split_step=1, rank=8))
    _steps(model, ctl, opt, range(4))
    assert ctl.split_done
    assert set(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    fresh = make_model("qwen2_moe")
    fresh.load_state_dict(model.state_dict())
    ids = batch(7)
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bind_optimizer_resets_the_experts_and_follows_the_rates():
    model = make_model("qwen2_moe")
    host = [p for b in find_moe_blocks(model) for p in (b.experts.gate_up_proj, b.experts.down_proj)]
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr_mult": 1.0, "name": "all"}], lr=1e-3,
                            weight_decay=0.1)
    lm_loss(model, batch()).backward()
    opt.step()
    assert all(p in opt.state for p in host)
    ctl = SDMoE(model, SDMoEConfig(split_step=1, rank=8, lr_shared_mult=2.0))
    assert ctl.before_forward(0, opt) is None
    assert ctl.before_forward(1, opt)["layers"]
    assert not any(p in opt.state for p in host)  # the tails start with fresh moments, as new parameters would
    assert [g["name"] for g in opt.param_groups] == ["all"]  # the experts stay in the host's group, at its rate
    assert {id(p) for p in host} <= {id(p) for p in opt.param_groups[0]["params"]}
    assert ctl.shared_optimizer.param_groups[0]["weight_decay"] == 0.0
    n = len(opt.param_groups)
    ctl.bind_optimizer(opt)  # idempotent
    assert len(opt.param_groups) == n
    opt.zero_grad()
    lm_loss(model, batch(1)).backward()
    ctl.after_backward(1)
    opt.step()
    ctl.after_optimizer_step(1)
    assert ctl.shared_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)  # the shared part's rate
    assert all(float(d.detach().abs().max()) == 0.0 for d in ctl.parameters())  # the delta is folded in and reset


def test_shared_optimizer_takes_the_experts_groups_settings_and_a_loaded_state_is_kept():
    """Optimizers built from group dicts (torchtitan's) keep betas/eps in the groups, torch's defaults in
    `defaults`; the shared part must step with the group's. A host whose state was loaded first keeps it."""
    model = make_model("qwen2_moe")
    host = [p for b in find_moe_blocks(model) for p in (b.experts.gate_up_proj, b.experts.down_proj)]
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-7,
                              "weight_decay": 0.1}])
    assert opt.defaults["betas"] == (0.9, 0.999)
    lm_loss(model, batch()).backward()
    opt.step()
    ctl = SDMoE(model, SDMoEConfig(split_step=0, rank=8))
    ctl.split()
    ctl.bind_optimizer(opt, reset_state=False)
    assert all(p in opt.state for p in host)  # the loaded moments stay
    shared = ctl.shared_optimizer.param_groups[0]
    assert shared["betas"] == (0.9, 0.95) and shared["eps"] == 1e-7 and shared["weight_decay"] == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save_at", [1, 5])
@pytest.mark.parametrize("basis_source", ["gradients", "activations"])
def test_resume_is_exact(kind, save_at, basis_source, tmp_path):
    cfg = SDMoEConfig(split_step=3, basis_source=basis_source, basis_batches=2, rank=8, tracker_oversample=2,
                      exact_every=4, reestimate_every=3, lr_shared_mult=2.0)
    ref, total = batch(99), 8

    def fresh():
        model = make_model(kind)
        return model, SDMoE(model, cfg), torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    model, ctl, opt = fresh()
    straight = _steps(model, ctl, opt, range(total), ref)

    model, ctl, opt = fresh()
    first = _steps(model, ctl, opt, range(save_at), ref)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sdmoe": ctl.state_dict()}, tmp_path / "c.pt")

    model, ctl, opt = fresh()
    saved = torch.load(tmp_path / "c.pt", weights_only=True)  # tensors and plain values only
    ctl.load_state_dict(saved["sdmoe"], opt)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    rest = _steps(model, ctl, opt, range(save_at, total), ref)
    assert first + rest == straight


@pytest.mark.parametrize("host_kwargs,fused", [({}, True), ({"foreach": False}, False), ({"fused": False}, False),
                                               ({"foreach": True}, False)])
def test_the_shared_optimizer_is_fused_unless_the_host_chose(host_kwargs, fused):
    """The deltas are many small tensors: their optimizer takes its class's fused kernel unless the host's
    settings name an implementation, which then holds for both."""
    model = make_model("qwen3_moe")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **host_kwargs)
    ctl = SDMoE(model, SDMoEConfig(split_step=0, rank=8))
    _steps(model, ctl, opt, range(2))
    group = ctl.shared_optimizer.param_groups[0]
    assert bool(group["fused"]) is fused
    assert group["foreach"] == host_kwargs.get("foreach")


def test_a_state_of_the_parametrization_engine_is_refused_in_one_line():
    model = make_model("qwen3_moe")
    ctl = SDMoE(model, SDMoEConfig(rank=8))
    with pytest.raises(ValueError, match="sdmoe 0.1.0"):
        ctl.load_state_dict({"version": 1, "split_done": True, "ranks": [8, 8]})


def test_reestimation_is_logged_and_exact_for_the_full_form():
    model, ref = make_model("olmoe"), batch(99)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctl = SDMoE(model, SDMoEConfig(split_step=0, reestimate_every=2, rank=8))
    records = []
    for step in range(4):
        ctl.before_forward(step, opt, ref)
        lm_loss(model, batch(step)).backward()
        ctl.after_backward(step)
        opt.step()
        if (r := ctl.after_optimizer_step(step, ref)) is not None:
            records.append(r)
        opt.zero_grad()
    assert len(records) == 2
    for r in records:
        for layer in r["layers"]:
            assert layer["rel_change"] < 1e-5  # full form + per_step re-splits exactly
            assert set(layer["basis_overlap"]) == {"gate", "up", "down"}
            assert all(0.0 <= v <= 1.0 + 1e-6 for v in layer["basis_overlap"].values())


def test_monitor_reports_overlaps_and_drift():
    model = make_model("deepseek_v3")
    ctl = convert(model, SDMoEConfig(rank=8, exact_every=1))
    lm_loss(model, batch()).backward()
    ctl.after_backward(0)
    m = ctl.monitor(k=4)
    assert m["random_baseline"] == pytest.approx(4 / 32)
    for layer in m["layers"]:
        for key in ("experts_overlap", "tails_overlap", "tracker_drift"):
            assert set(layer[key]) == {"gate", "up", "down"}
            assert all(0.0 <= v <= 1.0 + 1e-6 for v in layer[key].values())


def test_an_undecomposed_half_keeps_plain_gradients():
    """projections=("up", "down"): gate's gradient is left whole and nothing shared is added to it."""
    model, ids = make_model("qwen3_moe"), batch()
    ctl = convert(model, SDMoEConfig(rank=8, projections=("up", "down")))
    g_plain = _plain_grads(model, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.bind_optimizer(opt)
    lm_loss(model, ids).backward()
    ctl.after_backward(0)
    for layer, g in zip(ctl.layers, g_plain):
        assert set(layer.delta) == {"up", "down"}
        assert torch.allclose(layer.block.canonical("grad")["gate"], g["gate"], atol=1e-6, rtol=1e-4)
    gate_before = [b.canonical("data")["gate"].clone() for b in ctl.blocks]
    opt.step()
    ctl.after_optimizer_step(0)
    for b, before in zip(ctl.blocks, gate_before):
        after = b.canonical("data")["gate"]
        assert not torch.equal(after, before)  # trained as a plain weight
