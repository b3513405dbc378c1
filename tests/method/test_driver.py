"""`sdmoe.attach`: a plain PyTorch loop drives SD-MoE through the optimizer's and the model's hooks."""

from __future__ import annotations

import copy

import pytest
import torch

import sdmoe
from sdmoe.errors import UserError
from sdmoe.method import SDMoE, SDMoEConfig
from sdmoe.method.hooks import attached

from .method_helpers import batch, lm_loss, make_model

CONFIGS = {
    "default": dict(split_step=2),
    "fixed": dict(split_step=2, gradient_split="fixed", rank=8),
    "paper": dict(split_step=2, gradient_split="fixed", projection_sides="two", basis_source="shared", rank=4,
                  refresh_every=2),
    "control": dict(split_step=2, gradient_split="none"),
    "gradients, re-estimated, shared rate": dict(split_step=3, basis_source="gradients", reestimate_every=2,
                                                 basis_batches=2, lr_shared_mult=2.0),
}
STEPS, CLIP = 7, 0.5


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _explicit(model, cfg, ref):
    """The low-level API's documented loop (`sdmoe.method.controller`)."""
    opt, ctl = _opt(model), SDMoE(model, cfg)
    for step in range(STEPS):
        ctl.before_forward(step, opt, ref)
        lm_loss(model, batch(step)).backward()
        ctl.after_backward(step)
        ctl.clip_grad_norm_(CLIP)
        opt.step()
        ctl.after_optimizer_step(step, ref)
        opt.zero_grad(set_to_none=True)
    return ctl


def _attached(model, cfg, ref, **kw):
    opt = _opt(model)
    handle = sdmoe.attach(model, opt, cfg, max_norm=CLIP, reference_batch=ref, **kw)
    for step in range(STEPS):
        lm_loss(model, batch(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return handle


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "module_list"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_plain_loop_with_attach_equals_the_explicit_events(kind, name):
    ref = batch(99)
    a, b = make_model(kind), make_model(kind)
    ctl = _explicit(a, SDMoEConfig(**CONFIGS[name]), ref)
    handle = _attached(b, SDMoEConfig(**CONFIGS[name]), ref)
    assert handle.step == STEPS and handle.controller.split_done
    for (k, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(wb, wa, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    for ta, tb in zip(ctl.buffers(), handle.controller.buffers()):
        torch.testing.assert_close(tb, ta, rtol=0, atol=0)
    moved = [p for p, q in zip(a.parameters(), make_model(kind).parameters()) if not torch.equal(p, q)]
    assert moved  # the comparison is of trained weights


def test_without_a_config_the_driver_clips_like_torch():
    a, b = make_model("qwen3_moe"), make_model("qwen3_moe")
    opt = _opt(a)
    for step in range(3):
        lm_loss(a, batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(a.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    handle = sdmoe.attach(b, opt_b := _opt(b), None, max_norm=CLIP)
    norms = []
    for step in range(3):
        lm_loss(b, batch(step)).backward()
        opt_b.step()
        opt_b.zero_grad()
        norms.append(float(handle.grad_norm))
    for wa, wb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(wb, wa, rtol=0, atol=0)
    assert handle.controller is None and handle.state_dict() is None and all(n > CLIP for n in norms)


def test_skip_drops_a_non_finite_step_and_the_run_goes_on():
    model = make_model("qwen3_moe")
    opt = _opt(model)
    handle = sdmoe.attach(model, opt, SDMoEConfig(split_step=0), max_norm=CLIP, nan_policy="skip")
    seen = []
    handle.on("step", lambda step, skipped: seen.append((step, skipped)))
    lm_loss(model, batch(0)).backward()
    opt.step()
    opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    shared = [t.clone() for t in handle.controller.buffers()]
    moments = {k: v["exp_avg"].clone() for k, v in enumerate(opt.state.values())}
    (lm_loss(model, batch(1)) * float("nan")).backward()
    opt.step()
    assert handle.skipped and handle.nonfinite_grad is not None and not torch.isfinite(handle.grad_norm)
    opt.zero_grad()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for t, s in zip(handle.controller.buffers(), shared):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    assert all(torch.equal(v["exp_avg"], moments[k]) for k, v in enumerate(opt.state.values()))
    lm_loss(model, batch(2)).backward()
    opt.step()
    assert not handle.skipped and seen == [(0, False), (1, True), (2, False)] and handle.step == 3


def test_events_state_and_export():
    model = make_model("qwen3_moe")
    opt = _opt(model)
    refs = []
    handle = sdmoe.attach(model, opt, SDMoEConfig(split_step=1), max_norm=1.0,
                          reference_batch=lambda: refs.append(1) or batch(5))
    splits = []
    handle.on("split", lambda step, record: splits.append((step, record["logits_rel_change"])))
    for step in range(3):
        lm_loss(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    assert [s for s, _ in splits] == [1] and splits[0][1] < 1e-5 and refs  # the full split changes no logit
    sd = handle.state_dict()
    assert sd["step"] == 3 and sd["split_done"]
    with torch.no_grad():
        model.eval()  # an evaluation forward does not count as a step's
        lm_loss(model, batch(0))
    assert handle.step == 3
    twin = make_model("qwen3_moe")
    twin.load_state_dict(model.state_dict())
    resumed = sdmoe.attach(twin, _opt(twin), SDMoEConfig(split_step=1))
    resumed.load_state_dict(sd)
    assert resumed.step == 3 and resumed.controller.split_done
    sdmoe.export(model)  # detaches the driver too: the optimizer's steps are plain again
    assert attached(model) is None and not opt._optimizer_step_pre_hooks
    with pytest.raises(UserError, match="already attached"):
        sdmoe.attach(twin, _opt(twin), SDMoEConfig())


@pytest.mark.parametrize("kwargs, match", [
    (dict(nan_policy="ignore"), "nan_policy='ignore'"),
    (dict(max_norm=0.0), "max_norm=0.0"),
    (dict(max_norm=-1.0), "max_norm=-1.0"),
])
def test_bad_arguments_say_one_line(kwargs, match):
    model = make_model("qwen3_moe")
    with pytest.raises(UserError, match=match):
        sdmoe.attach(model, _opt(model), SDMoEConfig(), **kwargs)
    assert attached(model) is None


def test_an_optimizer_without_the_experts_is_refused_at_the_split():
    model = make_model("qwen3_moe")
    opt = torch.optim.AdamW(model.lm_head.parameters(), lr=1e-3)
    sdmoe.attach(model, opt, SDMoEConfig(split_step=0))
    with pytest.raises(UserError, match="holds none of the experts' weights"):
        lm_loss(model, batch(0))


def test_split_before_split_step_is_refused():
    model = make_model("qwen3_moe")
    handle = sdmoe.attach(model, _opt(model), SDMoEConfig(split_step=5))
    with pytest.raises(UserError, match="split_step=0"):
        handle.split()
