"""The command line as a user meets it: help, a tiny run, generation, one-line errors."""

import json
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


@pytest.mark.parametrize("command", ["train", "generate", "analyze", "compare", "study", "upcycle-compare",
                                     "finetune-compare", "evaluate", "upcycle", "report"])
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
        (["train", "--preset", "tiny", "--set", "data.vocab_size=100"], "data.vocab_size=100 is out of range"),
        (["train", "--preset", "tiny", "--text", "/nonexistent/corpus"], "/nonexistent/corpus"),
        (["generate", "/nonexistent/model"], "does not exist"),
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


def test_each_experiment_command_lists_its_presets_with_their_time(capsys):
    for command, fragment in (("compare", "demo (the first look, about 5 min on 2 cores"),
                              ("study", "study-tiny (tests"), ("upcycle-compare", "upcycle (a dense qwen3"),
                              ("finetune-compare", "finetune-tiny (tests"),
                              ("methods-compare", "(108 runs, about 65 min on 2 cores)")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert fragment in " ".join(capsys.readouterr().out.split())


def test_compare_then_report_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "tiny", "--seeds", "1", "--steps", "6", "--out", str(out), "--quiet",
            "--set", "sdmoe.split_step=2", "--set", "loop.eval_every=3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(a)" in text and "unigram entropy" in text and (out / "report.html").is_file()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and "(g)" in capsys.readouterr().out
    assert main(argv[:-2] + ["--variants", "baseline,control"]) == 2  # other settings, same --out
    assert "other settings" in _error_line(capsys)


def test_evaluate_scores_a_model_with_the_harness(tmp_path, capsys):
    pytest.importorskip("lm_eval")  # the eval extra; `make test` installs it
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "4", "--out", str(out), "--quiet",
                 "--set", "loop.monitor_every=0"]) == 0
    capsys.readouterr()
    scores_file = tmp_path / "scores.json"
    assert main(["evaluate", str(out / "model"), "--limit", "3", "--out", str(scores_file)]) == 0
    scores = json.loads(scores_file.read_text())
    assert {"sdmoe_cloze_drama", "sdmoe_mc_drama"} <= set(scores)
    assert 0.0 <= scores["sdmoe_mc_drama"]["acc"] <= 1.0
