"""NaN/Inf in training, as the user sees it: with loop.nan_policy=stop the error names ONE
step, the one metrics.jsonl names; with nan_policy=skip the summary counts the skipped
steps (across a resume too) and warns when most of the run was skipped."""

from __future__ import annotations

import re

import pytest

from sdmoe.cli import main
from sdmoe.train import step as step_module
from sdmoe.train.metrics import read_metrics
from tests.reliability.test_bad_input import error_line

TRAIN = ["train", "--preset", "tiny", "--quiet", "--steps", "20", "--set", "loop.checkpoint_every=5",
         "--set", "loop.monitor_every=0", "--set", "loop.eval_every=100", "--set", "loop.threads=1"]


def nan_at(monkeypatch, bad_steps):
    """The training loss of the given 0-based steps (counted over this process's loop) is NaN."""
    real, calls = step_module.causal_lm_loss, {"n": 0}

    def flaky(logits, ids):
        loss = real(logits, ids)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in bad_steps else loss

    monkeypatch.setattr(step_module, "causal_lm_loss", flaky)


def _nonfinite_events(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "nonfinite"]


def test_a_nan_stop_names_one_step_and_the_metrics_name_the_same(tmp_path, monkeypatch, capsys):
    # step index 6 (the 7th step) goes bad; the loop looks at log_every=5 steps, i.e. after the 10th
    nan_at(monkeypatch, {6})
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 2
    line = error_line(capsys)
    steps = re.findall(r"\bstep (\d+)", line)
    assert steps == ["7"], line  # once, not "step 6 (... at step 9 ...)"
    assert "last good checkpoint: step_0000005" in line
    assert "first non-finite gradient" not in line  # the gradients read at step 10 are not the first bad ones
    assert [r["step"] for r in _nonfinite_events(out)] == [7]


def test_a_nan_found_at_the_step_it_happens_names_the_parameter(tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {9})  # the 10th step: a logging step, read at once
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 2
    line = error_line(capsys)
    assert re.findall(r"\bstep (\d+)", line) == ["10"] and "(first non-finite gradient: " in line, line
    assert [r["step"] for r in _nonfinite_events(out)] == [10]


def test_a_real_divergence_agrees_with_its_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--set", "optim.lr=1e30", "--out", str(out)]) == 2
    line = error_line(capsys)
    (step,) = re.findall(r"\bstep (\d+)", line)
    assert [r["step"] for r in _nonfinite_events(out)] == [int(step)]
    finite_losses = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(s < int(step) for s in finite_losses)  # no loss record after the step named


def test_skipped_steps_are_counted_in_the_summary_and_most_skipped_warns(tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, set(range(1, 20)))  # 19 of 20 steps
    assert main([*TRAIN, "--set", "loop.nan_policy=skip", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "trained 20 steps, 19 skipped (non-finite loss or gradients)" in printed
    assert "WARNING: 19 of 20 steps were skipped" in printed


def test_a_few_skipped_steps_are_counted_without_a_warning_across_a_resume(tmp_path, monkeypatch, tiny_dataset):
    from sdmoe.train.config import preset
    from sdmoe.train.loop import train

    cfg = preset("tiny")
    cfg.loop.monitor_every, cfg.loop.threads, cfg.loop.nan_policy, cfg.loop.checkpoint_every = 0, 1, "skip", 5
    nan_at(monkeypatch, {2, 13})  # one before the stop at 10, one after the resume (the 4th step it runs)
    first = train(cfg, tmp_path / "run", progress=False, stop_after=10, dataset=tiny_dataset)
    assert first.skipped == 1
    result = train(cfg, tmp_path / "run", resume=True, progress=False, dataset=tiny_dataset)
    assert result.skipped == 2
    assert "trained 20 steps, 2 skipped" in result.summary() and "WARNING" not in result.summary()


@pytest.mark.parametrize("steps, skipped, warns", [(20, 0, False), (20, 10, False), (20, 11, True)])
def test_the_summary_warns_when_most_steps_were_skipped(steps, skipped, warns):
    from sdmoe.train.loop import TrainResult

    r = TrainResult(out_dir=None, model_dir=None, steps=steps, val_loss={"mean": 1.0}, unigram_entropy=1.0,
                    seconds=1.0, trainable_parameters=1, skipped=skipped)
    assert ("WARNING" in r.summary()) is warns
    assert ("skipped" in r.summary()) is bool(skipped)
