"""A checkpoint's own Python never runs: not with `y` on stdin, not on a terminal.

transformers imports the modules a checkpoint's `auto_map` names when asked to, and
when `trust_remote_code` is left unset it ASKS ("Do you wish to run the custom code?
[y/N]") on stdin. The checkpoints below carry such a module, which writes a marker
file the moment it is imported; `sdmoe generate / analyze / evaluate` get `y\\n` on
stdin (a pipe, then a pseudo-terminal) and must refuse in one line naming auto_map.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import time
from types import SimpleNamespace

import pytest

from sdmoe.errors import UserError

EVIL = '''\
import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import PreTrainedConfig, PreTrainedModel


class EvilConfig(PreTrainedConfig):
    model_type = "sdmoe_evil"


class EvilModel(PreTrainedModel):
    config_class = EvilConfig
'''


@pytest.fixture(scope="module")
def evil(tmp_path_factory, tiny_dataset):
    """Two copies of a good tiny checkpoint, each with a module that writes `marker` when imported:
    `model` names it in config.json (a model type transformers does not know, so transformers
    would ask), `tokenizer` in tokenizer_config.json (a tokenizer class it does not know)."""
    from sdmoe.models import build_model
    from sdmoe.train.config import preset

    root = tmp_path_factory.mktemp("untrusted")
    marker = root / "MARKER"
    tok = tiny_dataset.tokenizer
    good = root / "good"
    build_model(preset("tiny").model, len(tok), eos_token_id=tok.eos_token_id).save_pretrained(good)
    tok.save_pretrained(good)

    model = root / "model"
    shutil.copytree(good, model)
    (model / "evil_code.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "sdmoe_evil"
    cfg["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))

    tokenizer = root / "tokenizer"
    shutil.copytree(good, tokenizer)
    (tokenizer / "evil_code.py").write_text(EVIL.format(marker=str(marker)) + "\n\nclass EvilTokenizer:\n    pass\n")
    tcfg = json.loads((tokenizer / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "EvilTokenizer"
    tcfg["auto_map"] = {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return SimpleNamespace(root=root, marker=marker, model=model, tokenizer=tokenizer)


def _argv(command: str, ckpt, tmp_path) -> list[str]:
    if command == "generate":
        return ["generate", str(ckpt), "--max-new-tokens", "2"]
    if command == "analyze":
        return ["analyze", str(ckpt), "--rank", "4", "--batches", "1", "--seq-len", "16", "--batch-size", "2",
                "--out", str(tmp_path / "analysis")]
    return ["evaluate", str(ckpt), "--limit", "1", "--tasks-dir", str(tmp_path / "tasks")]


def _env(tmp_path) -> dict[str, str]:
    # Were the code run anyway, transformers would copy it here, not into ~/.cache.
    return {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def _through_a_pipe(argv, tmp_path) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "sdmoe", *argv], input="y\ny\ny\n", capture_output=True, text=True,
                       env=_env(tmp_path), timeout=240)
    return p.returncode, p.stderr


def _on_a_terminal(argv, tmp_path) -> tuple[int, str]:
    """stdin, stdout and stderr on a pseudo-terminal, `y` typed in: what a user at a shell does."""
    leader, follower = pty.openpty()
    attrs = termios.tcgetattr(follower)
    attrs[3] &= ~termios.ECHO  # the typed `y`s would come back as output lines
    termios.tcsetattr(follower, termios.TCSANOW, attrs)
    p = subprocess.Popen([sys.executable, "-m", "sdmoe", *argv], stdin=follower, stdout=follower, stderr=follower,
                         env=_env(tmp_path), close_fds=True)
    os.close(follower)
    os.write(leader, b"y\ny\ny\n")
    out, deadline = b"", time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
        os.close(leader)
    return rc, out.decode("utf-8", "replace")


@pytest.mark.parametrize("via", [_through_a_pipe, pytest.param(_on_a_terminal, marks=pytest.mark.slow)],
                         ids=["pipe", "tty"])
@pytest.mark.parametrize("command", ["generate", pytest.param("analyze", marks=pytest.mark.slow),
                                     pytest.param("evaluate", marks=pytest.mark.slow)])  # one command by default: the check is shared
def test_a_checkpoints_code_never_runs(command, via, evil, tmp_path):
    if command == "evaluate":
        pytest.importorskip("lm_eval")  # the eval extra (in the test extra)
    rc, err = via(_argv(command, evil.model, tmp_path), tmp_path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("sdmoe: error: "), lines
    assert "auto_map: AutoConfig -> evil_code.EvilConfig" in lines[0] and "never runs" in lines[0], lines[0]
    assert not evil.marker.exists()
    assert "Do you wish to run" not in err  # transformers was never asked
    assert not (tmp_path / "analysis").exists() and not (tmp_path / "tasks").exists()  # nothing written either


def test_tokenizer_code_is_refused_too(evil, tmp_path):
    rc, err = _through_a_pipe(_argv("generate", evil.tokenizer, tmp_path), tmp_path)
    assert rc == 2, err[-2000:]
    assert "tokenizer_config.json asks to run custom code (auto_map: AutoTokenizer -> evil_code.EvilTokenizer)" in err
    assert not evil.marker.exists()


def test_weights_only_analysis_reads_no_code(evil, tmp_path, capsys):
    """--weights-only never calls transformers: safe on a checkpoint with code (the way to analyse one)."""
    from sdmoe.cli import main

    assert main(["analyze", str(evil.model), "--weights-only", "--rank", "4", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "analysis.json").is_file()
    assert not evil.marker.exists()


@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_transformers_is_told_not_to_run_code_either(which, evil, monkeypatch):
    """Second line of defence: with our own check switched off, trust_remote_code=False still runs no code
    (transformers refuses the unknown model type; it reads the tokenizer with its own classes)."""
    import sdmoe.models.generate as gen

    monkeypatch.setattr(gen, "check_checkpoint", lambda path: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 3))  # what transformers would read its answer from
    try:
        gen.load_pretrained(getattr(evil, which))
    except UserError as e:
        assert which == "model" and "cannot load the model" in str(e), e
    else:
        assert which == "tokenizer", "a model of an unknown type and no code loaded"
    assert not evil.marker.exists()


def test_the_harness_gets_trust_remote_code_false(evil, monkeypatch, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from sdmoe.eval import tasks

    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(kwargs)
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    (tmp_path / "t.yaml").write_text('task: "sdmoe_cloze_x"\n')
    tasks.score_with_harness(evil.root / "good", tmp_path)
    assert seen["model_args"]["trust_remote_code"] is False
    assert seen["model_args"]["pretrained"] == str((evil.root / "good").resolve())
