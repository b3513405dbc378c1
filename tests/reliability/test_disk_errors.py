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


def _entries(out):
    """The run directory's entries, less `tensorboard/`: written when tensorboard is installed (an extra,
    and a dependency of torchtitan's), which the disk-error paths do not depend on."""
    return sorted(p.name for p in out.iterdir() if p.name != "tensorboard")


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
    assert _entries(out) == ["checkpoints", "metrics.jsonl", "run.json"]  # no .tmp-model-*
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


# -- the libraries' own exception types ---------------------------------------------
# torch.save and safetensors do not raise OSError on a full disk: torch (writing into a
# Python file, as checkpoints do) raises RuntimeError("... unexpected pos ...") with the
# OSError as its context, safetensors raises SafetensorError("... (os error 28)").


def _torch_full(*a, **k):
    try:
        _enospc()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def _safetensors_full(*a, **k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("target, raiser", [("torch.save", _torch_full), ("safetensors", _safetensors_full)])
def test_disk_full_as_the_libraries_report_it_is_one_line(target, raiser, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    m = (torch, "save") if target == "torch.save" else (ckpt, "save_file")
    monkeypatch.setattr(*m, raiser)
    assert main([*TRAIN, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "could not write checkpoint 5" in line and "(No space left on device)" in line and "--resume" in line
    # the half-written .tmp-step_0000005-* is gone, and so is the checkpoints/ its write made
    assert not (out / "checkpoints").exists() and (out / "run.json").is_file()


def test_disk_full_in_safetensors_while_writing_the_final_model(tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as mu

    out = tmp_path / "run"
    monkeypatch.setattr(mu, "safe_save_file", _safetensors_full)
    assert main([*TRAIN, "--set", "loop.checkpoint_every=12", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "could not write the final model" in line and "(No space left on device)" in line
    assert _entries(out) == ["checkpoints", "metrics.jsonl", "run.json"]  # no .tmp-model-*


def test_a_runtime_error_that_is_no_write_failure_is_not_passed_off_as_one(tmp_path, monkeypatch):
    def bug(*a, **k):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="a bug, not a full disk"):
        main([*TRAIN, "--out", str(tmp_path / "run")])


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real tmpfs of a given size (needs root and mount permission; skipped otherwise)."""
    import subprocess

    mounted = []

    def make(size: str):
        where = tmp_path / f"tmpfs-{size}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip() or r.returncode}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


# Sizes against the tiny preset's files: a checkpoint's model.safetensors is ~270 kB and its
# optimizer.pt ~550 kB, so 200k fails in safetensors and 600k in torch.save.
@pytest.mark.parametrize("size", ["200k", "600k"])
def test_a_really_full_disk_while_checkpointing(size, small_tmpfs, capsys):
    out = small_tmpfs(size) / "run"
    assert main([*TRAIN, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "could not write checkpoint 5" in line and "(No space left on device)" in line
    assert not (out / "checkpoints").exists()  # neither the half-written checkpoint nor the folder its write made


def test_a_really_full_disk_while_writing_the_final_model(small_tmpfs, capsys):
    # one checkpoint (~870 kB) fits in 1 MiB, the final model (~290 kB) then does not
    out = small_tmpfs("1m") / "run"
    args = [*TRAIN, "--set", "loop.checkpoint_every=12", "--set", "loop.keep_checkpoints=1", "--out", str(out)]
    assert main(args) == 2
    assert "could not write the final model" in _error_line(capsys)
    assert _entries(out) == ["checkpoints", "metrics.jsonl", "run.json"]
