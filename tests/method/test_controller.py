"""The controller: gradient split, tail invariant, optimizer rebinding, resume, re-estimation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sdmoe.method import SDMoE, SDMoEConfig, convert, export
from sdmoe.method.basis import canonical
from sdmoe.moe import find_moe_blocks

from .method_helpers import batch, lm_loss, make_model

KINDS = ("qwen3_moe", "module_list")


def _rel_in(t_EFD, u_DR):
    """||T U||_F / ||T||_F."""
    return float((t_EFD @ u_DR).norm() / t_EFD.norm())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,form", [("shared", "full"), ("shared", "lowrank"), ("per_expert", "full")])
def test_fixed_split_keeps_tails_out_of_u(kind, mode, form):
    model = make_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl = SDMoE(model, SDMoEConfig(mode=mode, shared_form=form, gradient_split="fixed", split_step=0, rank=8))
    for step in range(50):
        ctl.maybe_split(step, opt)
        lm_loss(model, batch(step)).backward()
        ctl.after_backward(step)
        opt.step()
        ctl.after_optimizer_step(step)
        opt.zero_grad()
    for state in ctl.states:
        views, _ = state.tail_views("data")
        assert set(views) == {"gate", "up", "down"}
        for p, t in views.items():
            assert t.norm() > 0
            assert _rel_in(t, state.basis(p)) <= 1e-5


def _plain_grads(model, ids):
    """G_i = dL/dW_i of the plain model with the same weights, canonical E x F x D per layer."""
    plain = copy.deepcopy(model)
    export(plain)
    lm_loss(plain, ids).backward()
    return [canonical(b, "grad") for b in find_moe_blocks(plain)]


@pytest.mark.parametrize("kind", KINDS)
def test_lowrank_shared_gradient_is_sum_of_projected_expert_grads(kind):
    model, ids = make_model(kind), batch()
    ctl = convert(model, SDMoEConfig(shared_form="lowrank", gradient_split="fixed", rank=6))
    g_plain = _plain_grads(model, ids)
    lm_loss(model, ids).backward()
    for state, g in zip(ctl.states, g_plain):
        for p in ("gate", "up", "down"):
            u = state.basis(p)
            want = g[p].sum(0) @ u  # sum_i G_i U
            assert torch.allclose(state.coef_grad(p), want, atol=1e-6, rtol=1e-4)
    ctl.after_backward(0)
    for state, g in zip(ctl.states, g_plain):
        views, _ = state.tail_views("grad")
        for p, t in views.items():
            u = state.basis(p)
            assert float((t @ u).norm()) <= 1e-5 * float(t.norm())
            assert torch.allclose(t, g[p] - g[p] @ u @ u.T, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_per_step_split_and_control(kind):
    ids = batch()
    split_model = make_model(kind)
    ctl = convert(split_model, SDMoEConfig(gradient_split="per_step", rank=8))
    control_model = make_model(kind)
    control = convert(control_model, SDMoEConfig(gradient_split="none", rank=8))
    g_plain = _plain_grads(split_model, ids)
    for m in (split_model, control_model):
        lm_loss(m, ids).backward()
    ctl.after_backward(0)
    control.after_backward(0)
    for state, cstate, g in zip(ctl.states, control.states, g_plain):
        views, _ = state.tail_views("grad")
        cviews, _ = cstate.tail_views("grad")
        for p in ("gate", "up", "down"):
            q = state.q(p)
            gsum = g[p].sum(0)
            # split: shared gets (sum_i G_i) QQ^T, tails G_i (I - QQ^T), orthogonal to Q
            assert torch.allclose(state.coef_grad(p), gsum @ q @ q.T, atol=1e-6, rtol=1e-4)
            assert float((views[p] @ q).norm()) <= 1e-5 * float(views[p].norm())
            assert torch.allclose(views[p], g[p] - g[p] @ q @ q.T, atol=1e-6, rtol=1e-4)
            # Q is the (tracked) top-r subspace of the gradients: it holds most of their energy
            inside = (g[p] @ q).square().sum() / g[p].square().sum()
            assert inside > 8 / state.d
            # control: plain autograd gradients
            assert torch.allclose(cstate.coef_grad(p), gsum, atol=1e-6, rtol=1e-4)
            assert torch.allclose(cviews[p], g[p], atol=1e-6, rtol=1e-4)


def test_rebind_optimizer_and_param_groups():
    model = make_model("qwen2_moe")
    host = [p for b in find_moe_blocks(model) for p in (b.experts.gate_up_proj, b.experts.down_proj)]
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr_mult": 1.0, "name": "all"}], lr=1e-3,
                            weight_decay=0.1)
    lm_loss(model, batch()).backward()
    opt.step()
    cfg = SDMoEConfig(split_step=1, rank=8, lr_shared_mult=2.0, lr_tail_mult=0.5)
    ctl = SDMoE(model, cfg)
    assert ctl.maybe_split(0, opt) is None
    assert ctl.maybe_split(1, opt)["layers"]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in ids for p in host)
    assert not any(p in opt.state for p in host)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["sdmoe.shared"]["lr"] == pytest.approx(2e-3) and groups["sdmoe.shared"]["lr_mult"] == 2.0
    assert groups["sdmoe.tails"]["lr"] == pytest.approx(5e-4) and groups["sdmoe.tails"]["weight_decay"] == 0.1
    managed = {id(p) for g in ctl.param_groups(1.0, 0.0) for p in g["params"]}
    every = {id(p) for p in model.parameters()}
    assert managed | {id(p) for p in ctl.other_parameters()} == every
    assert all(id(p) in ids for p in model.parameters())  # everything trainable is in the optimizer
    n = len(opt.param_groups)
    ctl.rebind_optimizer(opt)  # idempotent
    assert len(opt.param_groups) == n


def _run(model, ctl, opt, steps, ref):
    losses = []
    for step in steps:
        ctl.maybe_split(step, opt, ref)
        loss = lm_loss(model, batch(step))
        loss.backward()
        ctl.after_backward(step) if ctl.split_done else ctl.observe(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ctl.after_optimizer_step(step, ref)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save_at", [1, 5])
def test_resume_is_exact(kind, save_at, tmp_path):
    cfg = SDMoEConfig(split_step=3, basis_source="gradients", basis_batches=2, rank=8, router_input="residual",
                      tracker_oversample=2, exact_every=4, reestimate_every=3)
    ref, total = batch(99), 8

    def fresh():
        model = make_model(kind)
        return model, SDMoE(model, cfg), torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    model, ctl, opt = fresh()
    straight = _run(model, ctl, opt, range(total), ref)

    model, ctl, opt = fresh()
    first = _run(model, ctl, opt, range(save_at), ref)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    (tmp_path / "sdmoe.json").write_text(json.dumps(ctl.state_dict()))  # the trainer keeps it in JSON

    model, ctl, opt = fresh()
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    saved["sdmoe"] = json.loads((tmp_path / "sdmoe.json").read_text())
    if saved["sdmoe"]["split_done"]:
        ctl.prepare_for_load()
        ctl.rebind_optimizer(opt)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    ctl.load_state_dict(saved["sdmoe"])
    rest = _run(model, ctl, opt, range(save_at, total), ref)
    assert first + rest == straight


def test_reestimation_is_logged_and_exact_for_the_full_form():
    model, ref = make_model("olmoe"), batch(99)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctl = SDMoE(model, SDMoEConfig(split_step=0, reestimate_every=2, rank=8))
    records = []
    for step in range(4):
        ctl.maybe_split(step, opt, ref)
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
    """projections=("up", "down"): gate's tails carry the whole gate weight, its shared half stays 0."""
    model, ids = make_model("qwen3_moe"), batch()
    ctl = convert(model, SDMoEConfig(rank=8, projections=("up", "down")))
    g_plain = _plain_grads(model, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    lm_loss(model, ids).backward()
    ctl.after_backward(0)
    for state, g in zip(ctl.states, g_plain):
        views, _ = state.tail_views("grad")
        assert set(views) == {"up", "down"}
        lay = state.fused
        assert torch.allclose(lay.gate_up_views(state.tails_gate_up.grad)[0], g["gate"], atol=1e-6, rtol=1e-4)
    opt.step()
    for state in ctl.states:
        assert float(state.coef("gate").detach().abs().max()) == 0.0
