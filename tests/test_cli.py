"""The command line as a user meets it: help, a tiny run, generation, one-line errors."""

import subprocess
import sys

import pytest

from sdmoe.cli import main


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sdmoe: error: ")
    return err[0]


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "sdmoe", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "generate", "analyze"):
        assert command in out


@pytest.mark.parametrize("command", ["train", "generate", "analyze"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: sdmoe" in capsys.readouterr().out


def test_train_then_generate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "6", "--out", str(out), "--quiet",
                 "--set", "loop.eval_every=3", "--set", "loop.monitor_every=0"]) == 0
    summary = capsys.readouterr().out
    assert "validation loss" in summary and "unigram entropy" in summary
    assert main(["generate", str(out / "model"), "--prompt", "The king", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The king") and len(text.strip()) > len("The king")
    # The same command again must not touch the finished run.
    assert main(["train", "--preset", "tiny", "--steps", "6", "--out", str(out), "--quiet"]) == 2
    assert "holds a previous run" in _error_line(capsys)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--preset", "huge"], "unknown preset"),
        (["train", "--preset", "tiny", "--set", "model.top_k=9"], "exceeds model.num_experts"),
        (["train", "--preset", "tiny", "--set", "model.num_heads=3"], "not divisible by model.num_heads"),
        (["train", "--preset", "tiny", "--set", "data.vocab_size=100"], "vocab_size is 100"),
        (["train", "--preset", "tiny", "--text", "/nonexistent/corpus"], "/nonexistent/corpus"),
        (["generate", "/nonexistent/model"], "is not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, tmp_path, capsys):
    argv = argv + (["--out", str(tmp_path / "o"), "--quiet"] if argv[0] == "train" else [])
    assert main(argv) == 2
    assert fragment in _error_line(capsys)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_empty_corpus_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["train", "--preset", "tiny", "--text", str(empty), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "empty" in _error_line(capsys)
