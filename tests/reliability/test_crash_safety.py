"""SIGKILL a real `sdmoe train` process, resume it, and get bit-for-bit the uninterrupted run.

Per method (baseline, SD-MoE) two subprocesses are killed:
  A. from outside, as soon as the first checkpoint directory appears (polled, no blind sleeps);
  B. from inside, in the middle of writing checkpoint 20 (the model file half written),
     the worst instant for a checkpoint writer;
then the run is resumed in-process to the end and compared with an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdmoe.cli import main
from sdmoe.train import checkpoint as ckpt
from sdmoe.train.metrics import read_metrics

ARGS = [
    "train", "--preset", "tiny", "--steps", "40", "--quiet",
    "--set", "loop.checkpoint_every=5", "--set", "loop.threads=1",
    "--set", "loop.monitor_every=0", "--set", "loop.eval_every=20",
]
TIMEOUT_S = 240  # generous: the CI box is shared; a healthy run needs ~10 s

# Kill self while checkpoint 20 is being written: the model file is half on disk,
# the optimizer and state files are not written yet.
KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import sdmoe.train.checkpoint as ck
    real = ck.save_file
    def dying_save_file(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        if "step_0000020" in filename:
            p = Path(filename)
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    ck.save_file = dying_save_file
    from sdmoe.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture()
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _argv(method: str, out: Path, *extra: str) -> list[str]:
    return [*ARGS, "--method", method, "--out", str(out), *extra]


def _steps(out: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in ckpt.list_checkpoints(out / "checkpoints")]


def _assert_every_checkpoint_loads(out: Path) -> None:
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        model_state, optim_state, state = ckpt.load_checkpoint(path)  # UserError if anything is torn
        assert state["step"] == int(path.name.removeprefix("step_"))
        assert model_state and optim_state["state"]


def _kill_after_first_checkpoint(argv: list[str], out: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "sdmoe", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not _steps(out):
            if proc.poll() is not None:
                pytest.fail(f"train exited ({proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read().decode()[-500:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return proc.returncode


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _events(out: Path) -> list[tuple]:
    """What the metrics log says happened, without the wall-clock fields."""
    return [(r.get("event", "log"), r["step"], r.get("loss")) for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("method", ["baseline", pytest.param("sd-moe", marks=pytest.mark.slow)])
def test_sigkill_then_resume_equals_an_uninterrupted_run(method, tmp_path, capsys, restore_threads):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_argv(method, straight)) == 0  # also warms the tokenizer/token cache for the subprocesses

    # A: killed from outside right after the first checkpoint appeared.
    assert _kill_after_first_checkpoint(_argv(method, killed), killed) == -signal.SIGKILL
    first = _steps(killed)
    assert first and first[-1] < 40 and not (killed / "model").exists()
    _assert_every_checkpoint_loads(killed)

    # B: resumed, then killed while writing checkpoint 20 (half a model file on disk).
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *_argv(method, killed, "--resume")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
    torn = list((killed / "checkpoints").glob(".tmp-step_0000020-*"))
    assert len(torn) == 1 and not (torn[0] / "state.json").exists()  # the torn write is only a temp dir
    assert _steps(killed) == [10, 15]  # keep_checkpoints=2; step 20 never became a checkpoint
    _assert_every_checkpoint_loads(killed)

    # C: resumed to the end: continues from step 15, cleans the torn temp dir, finishes.
    assert main(_argv(method, killed, "--resume")) == 0
    capsys.readouterr()
    leftovers = [p.name for d in (killed, killed / "checkpoints") for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert _steps(killed) == [35, 40]
    _assert_every_checkpoint_loads(killed)
    assert json.loads((killed / "run.json").read_text())["status"] == "done"

    # Metrics were truncated to each checkpoint: the log reads as one uninterrupted run.
    assert _events(killed) == _events(straight)
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_resume_of_a_run_killed_before_its_first_checkpoint(tmp_path, tiny_config, tiny_dataset, monkeypatch):
    """run.json and metrics exist, no checkpoint: --resume starts over, with a clean log."""
    from sdmoe.train import loop

    tiny_config.loop.steps = 6
    tiny_config.loop.checkpoint_every = 5
    straight = loop.train(tiny_config, tmp_path / "straight", progress=False, dataset=tiny_dataset)

    def die(*a, **k):
        raise KeyboardInterrupt  # as a SIGINT would, at the first checkpoint

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_checkpoint", die)
        with pytest.raises(KeyboardInterrupt):
            loop.train(tiny_config, out, progress=False, dataset=tiny_dataset)
    assert (out / "run.json").is_file() and not _steps(out)
    # What a SIGKILL during the final save / a JSON write leaves behind.
    (out / ".tmp-model-abc").mkdir()
    (out / ".tmp-model-abc" / "model.safetensors").write_bytes(b"half")
    (out / ".run.json.xyz.tmp").write_text("{")
    resumed = loop.train(tiny_config, out, resume=True, progress=False, dataset=tiny_dataset)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert _events(out) == _events(tmp_path / "straight")
    assert resumed.val_loss == straight.val_loss
