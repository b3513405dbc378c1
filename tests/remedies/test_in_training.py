"""The remedies inside a training step: gradient accumulation, global-batch balancing, Guo et al.'s terms
(in `sdmoe train` and in a plain loop of one's own), and their refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdmoe.cli import main
from sdmoe.errors import UserError
from sdmoe.models import ModelConfig, build_model
from sdmoe.moe import find_moe_blocks
from sdmoe.remedies.specialisation import SpecialisationLosses, routed_outputs
from sdmoe.train.config import preset, validate
from sdmoe.train.metrics import read_metrics
from sdmoe.train.step import TrainStep

TRAIN = ["train", "--preset", "tiny", "--quiet", "--set", "loop.threads=1", "--set", "loop.monitor_every=0"]


def _step(style="qwen3_moe", micro=1, balance="micro_batch", coef=0.0, seed=0):
    """One SGD step (lr 1: the weights move by exactly the gradient) of a tiny model on a fixed batch."""
    cfg = preset("tiny")
    cfg.model.style, cfg.loop.micro_batches, cfg.aux.balance, cfg.model.aux_loss_coef = style, micro, balance, coef
    cfg.optim.grad_clip = 1e9
    cfg.data.batch_size = 8
    model = build_model(cfg.model, 128, seed=seed)
    step = TrainStep(cfg, model, torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"))
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(seed))
    losses = step(ids)
    step.close()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_micro_batches_add_up_to_the_whole_batchs_gradient(one_thread):
    whole, w1 = _step(micro=1)
    parts, w4 = _step(micro=4)
    assert parts.lm.item() == pytest.approx(whole.lm.item(), rel=1e-6)
    for name, p in w1.items():
        torch.testing.assert_close(w4[name], p, rtol=0, atol=2e-6, msg=name)


def test_global_batch_balance_is_the_micro_batchs_with_one_and_differs_with_several(one_thread):
    local, w_local = _step(micro=1, coef=0.1)
    glob, w_glob = _step(micro=1, coef=0.1, balance="global_batch")
    assert glob.balance.item() == pytest.approx(local.balance.item(), rel=1e-5)
    for name, p in w_local.items():
        torch.testing.assert_close(w_glob[name], p, rtol=0, atol=1e-6, msg=name)
    local4, _ = _step(micro=4, coef=0.1)
    glob4, _ = _step(micro=4, coef=0.1, balance="global_batch")
    assert abs(glob4.balance.item() - local4.balance.item()) > 1e-4  # frequencies over 4 micro-batches, not each


@pytest.mark.parametrize("style", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_the_recomputed_expert_outputs_are_the_blocks_own(style, one_thread):
    model = build_model(ModelConfig(style=style, hidden_size=32, num_layers=1, num_heads=2, num_experts=4, top_k=2,
                                    expert_ffn=16), 64, seed=1)
    block = find_moe_blocks(model)[0]
    seen = {}
    block.router.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].reshape(-1, a[0].shape[-1])))
    block.router.register_forward_hook(lambda m, a, out: seen.update(w=out[1], idx=out[2]))
    block.experts.register_forward_hook(lambda m, a, out: seen.update(y=out))
    model(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)))
    y_TKD = routed_outputs(block, seen["x"], seen["idx"])
    mixed = (seen["w"].unsqueeze(-1).to(y_TKD.dtype) * y_TKD).sum(1)  # what the experts module returns
    torch.testing.assert_close(mixed, seen["y"].reshape(mixed.shape), rtol=1e-5, atol=1e-6)


def test_the_terms_reach_the_experts_and_the_router_in_a_plain_loop(one_thread):
    model = build_model(ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4,
                                    top_k=2, expert_ffn=16), 64, seed=2)
    terms = SpecialisationLosses(model)  # the authors' targets
    model(torch.randint(0, 64, (2, 8)))
    loss = terms.loss()
    loss.backward()
    block = find_moe_blocks(model)[0]
    assert terms.weights["orthogonality"] > 0 and terms.weights["variance"] > 0
    assert block.host_parameters(("gate",))[0].grad.abs().sum() > 0  # the orthogonality term
    assert block.router.weight.grad.abs().sum() > 0  # the variance term
    assert terms.loss() is None  # the record was consumed
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
    assert terms.loss() is None  # evaluation forwards are not recorded
    terms.remove()


def test_sdmoe_train_with_the_terms_logs_them_and_resumes_exactly(tmp_path):
    on = ["--set", "aux.orthogonality=1e-4", "--set", "aux.variance=1e-2", "--set", "loop.log_every=1",
          "--set", "loop.checkpoint_every=3", "--steps", "6"]
    assert main([*TRAIN, *on, "--out", str(tmp_path / "whole")]) == 0
    logs = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "aux_loss" in r]
    assert len(logs) == 6 and all(r["orthogonality_loss"] > 0 and r["variance_loss"] > 0 for r in logs)
    from sdmoe.train.config import apply_overrides
    from sdmoe.train.loop import train

    cfg = preset("tiny")
    apply_overrides(cfg, [a for a in on[1::2] if "=" in a] + ["loop.threads=1", "loop.monitor_every=0",
                                                              "loop.steps=6"])
    train(cfg, tmp_path / "cut", progress=False, stop_after=3)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("whole", "cut"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_bad_settings_are_one_line(tmp_path, capsys):
    cfg = preset("tiny")
    cfg.loop.micro_batches = 3
    with pytest.raises(UserError, match="loop.micro_batches=3 does not divide data.batch_size=4"):
        validate(cfg)
    cfg = preset("tiny")
    cfg.model.style, cfg.aux.balance = "deepseek_v3", "global_batch"
    with pytest.raises(UserError, match="deepseek_v3 balances with its router bias"):
        validate(cfg)
    assert main([*TRAIN, "--set", "aux.orthogonality=-1", "--out", str(tmp_path / "r")]) == 2
    assert "aux.orthogonality=-1.0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_experts_with_biases_are_refused_in_one_line():
    from sdmoe.moe.families import build_tiny

    with pytest.raises(UserError, match="add biases .* set aux.orthogonality=0"):
        SpecialisationLosses(build_tiny("gpt_oss"))
