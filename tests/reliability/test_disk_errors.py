"""Disk full / unwritable paths: a one-line UserError, exit 2, no partial checkpoint,
earlier checkpoints intact, and `--resume` finishes the run once there is room."""

from __future__ import annotations

import errno

import pytest
import torch
import transformers

from sdmoe.cli import main
from sdmoe.train import checkpoint as ckpt

TRAIN = ["train", "--preset", "tiny", "--quiet", "--steps", "12", "--set", "loop.checkpoint_every=5",
         "--set", "loop.monitor_every=0", "--set", "loop.eval_every=100", "--set", "loop.threads=1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "it/s]" not in ln and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("sdmoe: error: "), lines
    return lines[0]


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_disk_full_while_checkpointing(writer, tmp_path, monkeypatch, capsys, tiny_dataset):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt.save_file if writer == "safetensors" else torch.save

    def full_on_second_checkpoint(obj, path, *a, **k):
        calls["n"] += 1
        real(obj, path, *a, **k)  # the bytes reach the temp dir ...
        if calls["n"] == 2:
            _enospc()  # ... then the disk fills up

    with monkeypatch.context() as m:
        m.setattr(*((ckpt, "save_file") if writer == "safetensors" else (torch, "save")), full_on_second_checkpoint)
        assert main([*TRAIN, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "could not write checkpoint 10" in line and "No space left on device" in line and "--resume" in line
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert entries == ["step_0000005"]  # no .tmp-step_0000010-*, step 5 untouched
    ckpt.load_checkpoint(out / "checkpoints" / "step_0000005")
    assert not (out / "model").exists()

    assert main([*TRAIN, "--out", str(out), "--resume"]) == 0  # room again
    assert (out / "model" / "model.safetensors").is_file()


def test_disk_full_while_writing_the_final_model(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = transformers.PreTrainedModel.save_pretrained

    def half_then_full(self, path, *a, **k):
        real(self, path, *a, **k)
        _enospc()

    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "save_pretrained", half_then_full)
        assert main([*TRAIN, "--out", str(out)]) == 2
    assert "could not write the final model" in _error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "run.json"]  # no .tmp-model-*
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_0000010", "step_0000012"]
    assert main([*TRAIN, "--out", str(out), "--resume"]) == 0  # nothing left to train: only the export
    assert (out / "model" / "model.safetensors").is_file()


def test_disk_full_while_logging_metrics(tmp_path, monkeypatch, capsys):
    from sdmoe.train import metrics

    out = tmp_path / "run"
    real = metrics.MetricsLog.write
    calls = {"n": 0}

    def full_later(self, record):
        calls["n"] += 1
        if calls["n"] == 3:
            self._file.write = _enospc
        return real(self, record)

    monkeypatch.setattr(metrics.MetricsLog, "write", full_later)
    assert main([*TRAIN, "--out", str(out)]) == 2
    assert "could not write metrics" in _error_line(capsys)


def test_output_path_below_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*TRAIN, "--out", str(blocker / "run")]) == 2
    assert "cannot write to" in _error_line(capsys)
    assert blocker.read_text() == "x"
