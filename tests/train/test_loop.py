"""End-to-end loss traces of the training loop on the bundled text (tiny preset, seconds)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.train import loop as loop_module
from sdmoe.train import step as step_module
from sdmoe.train.config import apply_overrides, preset
from sdmoe.train.loop import NonFiniteError, train
from sdmoe.train.metrics import read_metrics


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "event" not in r}


def test_training_learns_and_saves_a_loadable_model(tmp_path, tiny_config, tiny_dataset):
    from transformers import AutoModelForCausalLM

    result = train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset)
    losses = _losses(tmp_path / "run")
    assert losses[20] < losses[5]
    assert result.val_loss["mean"] < torch.log(torch.tensor(512.0)).item()
    model = AutoModelForCausalLM.from_pretrained(result.model_dir, trust_remote_code=False)
    assert model.config.model_type == tiny_config.model.style
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"


@pytest.mark.parametrize("method", ["baseline", "sd-moe"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_config, tiny_dataset, method):
    tiny_config.method = method
    tiny_config.loop.checkpoint_every = 5
    train(tiny_config, tmp_path / "straight", progress=False, dataset=tiny_dataset)
    # Stop after 8 steps (checkpointed there, as a SIGTERM would be); for SD-MoE the split happened at step 5.
    train(tiny_config, tmp_path / "resumed", progress=False, dataset=tiny_dataset, stop_after=8)
    assert not (tmp_path / "resumed" / "model").exists()
    train(tiny_config, tmp_path / "resumed", resume=True, progress=False, dataset=tiny_dataset)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def test_refuses_to_mix_runs(tmp_path, tiny_config, tiny_dataset):
    out = tmp_path / "run"
    tiny_config.loop.steps = 5
    train(tiny_config, out, progress=False, dataset=tiny_dataset)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="holds a previous run; pass --resume"):
        train(tiny_config, out, progress=False, dataset=tiny_dataset)
    tiny_config.model.hidden_size = 64
    with pytest.raises(UserError, match="different model config"):
        train(tiny_config, out, resume=True, progress=False, dataset=tiny_dataset)
    assert (out / "metrics.jsonl").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no sdmoe run"):
        train(tiny_config, tmp_path / "other", progress=False, dataset=tiny_dataset)
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny_config, tmp_path / "fresh", resume=True, progress=False, dataset=tiny_dataset)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path, tiny_config, tiny_dataset):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(UserError, match="cannot write to"):
        train(tiny_config, locked / "run", progress=False, dataset=tiny_dataset)


def test_output_path_that_is_a_file(tmp_path, tiny_config, tiny_dataset):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to"):
        train(tiny_config, blocker / "run", progress=False, dataset=tiny_dataset)


def _nan_at(step_to_fail, monkeypatch):
    calls = {"n": 0}
    real = step_module.causal_lm_loss

    def flaky(logits, ids):
        loss = real(logits, ids)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == step_to_fail + 1 else loss

    monkeypatch.setattr(step_module, "causal_lm_loss", flaky)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, tiny_dataset, monkeypatch):
    tiny_config.loop.checkpoint_every = 5
    tiny_config.loop.eval_every = 100
    _nan_at(7, monkeypatch)
    with pytest.raises(NonFiniteError, match=r"not finite at step 8; last good checkpoint: step_0000005"):
        train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000005"]


def test_the_loop_reads_the_device_only_where_it_reads_anyway(tmp_path, tiny_config, tiny_dataset, monkeypatch):
    """nan_policy=stop: the finiteness check (a host-device sync) runs at log/eval/checkpoint steps only."""
    tiny_config.loop.log_every, tiny_config.loop.eval_every, tiny_config.loop.checkpoint_every = 5, 100, 100
    tiny_config.method = "sd-moe"
    watch = loop_module.NonFiniteWatch
    real_update, real_first = watch.update, watch.first_step
    steps, checked = [], []
    monkeypatch.setattr(watch, "update", lambda self, step, *v: steps.append(step) or real_update(self, step, *v))
    monkeypatch.setattr(watch, "first_step", lambda self: checked.append(real_first(self)) or checked[-1])
    train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset)
    assert steps == list(range(20))
    assert checked == [None] * 4  # at steps 5, 10, 15, 20 of 20, not every step; all finite


def test_nan_skip_policy_skips_the_batch_and_finishes(tmp_path, tiny_config, tiny_dataset, monkeypatch):
    tiny_config.loop.nan_policy = "skip"
    tiny_config.loop.eval_every = 100
    _nan_at(3, monkeypatch)
    result = train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset)
    assert result.model_dir is not None
    skipped = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "skipped"]
    assert [r["step"] for r in skipped] == [3]


@pytest.mark.parametrize("method", ["baseline", "sd-moe"])
def test_bf16_autocast_tracks_float32(tmp_path, tiny_config, tiny_dataset, method):
    tiny_config.method = method
    tiny_config.loop.steps = 10
    fp32 = train(tiny_config, tmp_path / "fp32", progress=False, dataset=tiny_dataset)
    tiny_config.loop.precision = "bf16"
    bf16 = train(tiny_config, tmp_path / "bf16", progress=False, dataset=tiny_dataset)
    assert all(math.isfinite(v) for v in _losses(tmp_path / "bf16").values())
    # Same run up to bf16 rounding of activations: the losses stay close, not equal.
    assert abs(bf16.val_loss["mean"] - fp32.val_loss["mean"]) < 0.05
    assert bf16.val_loss["mean"] != fp32.val_loss["mean"]


def test_the_default_variant_follows_its_recorded_loss_trace(tmp_path):
    """The default SD-MoE on the tiny preset, step by step, against a trace recorded once (tests/train/data):
    a change of the method's numbers shows here first."""
    rec = json.loads((Path(__file__).parent / "data" / "loss_trace_default.json").read_text())
    cfg = preset("tiny")
    cfg.method = "sd-moe"
    apply_overrides(cfg, ["loop.log_every=1", "loop.threads=1", "loop.monitor_every=0"])
    train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r and "event" not in r]
    assert len(losses) == len(rec["losses"]) == cfg.loop.steps
    for step, (got, want) in enumerate(zip(losses, rec["losses"])):
        assert got == pytest.approx(want, rel=1e-5), step
