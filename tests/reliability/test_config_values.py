"""Config values through `sdmoe.cli.main`: a value outside its declaration is ONE `sdmoe: error:`
line and exit 2, before anything is written; a resume reproduces the interrupted run or refuses.

The property-based test over every field (hypothesis) is `tests/train/test_config.py`."""

from __future__ import annotations

import json

import pytest

from sdmoe.cli import main
from sdmoe.errors import UserError

from .test_bad_input import TRAIN, error_line, snapshot

COMPARE = ["compare", "--preset", "tiny", "--quiet"]


def _deep_config(tmp):
    p = tmp / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return str(p)


def _list_for_string(tmp):
    p = tmp / "list.json"
    p.write_text(json.dumps({"model": {"style": ["qwen2_moe"]}}))
    return str(p)


def _config_dir(tmp):
    (tmp / "configs").mkdir()
    return str(tmp / "configs")


# (id, argv(tmp, out), fragment of the one error line)
CASES = [
    # values that trained to exit 0 with a ruined model
    ("grad_clip_negative", lambda t, o: [*TRAIN, "--set", "optim.grad_clip=-1", "--out", o],
     "optim.grad_clip=-1.0 is out of range; use a number > 0"),
    ("min_lr_ratio_negative", lambda t, o: [*TRAIN, "--set", "optim.min_lr_ratio=-5", "--out", o],
     "optim.min_lr_ratio=-5.0 is out of range; use a number in [0, 1]"),
    ("lr_nan", lambda t, o: [*TRAIN, "--set", "optim.lr=nan", "--out", o], "optim.lr=nan is not a finite number"),
    ("lr_inf", lambda t, o: [*TRAIN, "--set", "optim.lr=inf", "--out", o], "optim.lr=inf is not a finite number"),
    ("betas_one", lambda t, o: [*TRAIN, "--set", "optim.betas=[0.9,1]", "--out", o],
     "optim.betas=[0.9, 1.0] is out of range; use a number in [0, 1)"),
    ("rank_list_of_floats", lambda t, o: [*TRAIN, "--method", "sd-moe", "--set", "sdmoe.rank=[4.7,2.2]", "--out", o],
     "sdmoe.rank[0] takes an integer, got 4.7"),
    ("monitor_rank_list", lambda t, o: [*TRAIN, "--set", "loop.monitor_rank=[4,4]", "--out", o],
     "loop.monitor_rank takes an integer"),
    # flags go through the same declarations
    ("seed_negative", lambda t, o: [*TRAIN, "--seed", "-1", "--out", o], "loop.seed=-1 is out of range"),
    ("steps_zero", lambda t, o: [*TRAIN, "--steps", "0", "--out", o], "loop.steps=0 is out of range; use an integer >= 1"),
    # config files
    ("config_list_for_string", lambda t, o: [*TRAIN, "--config", _list_for_string(t), "--out", o],
     "unknown model style ['qwen2_moe']; model.style must be one of"),
    ("config_deeply_nested", lambda t, o: [*TRAIN, "--config", _deep_config(t), "--out", o], "nests too deeply"),
    ("config_is_a_directory", lambda t, o: [*TRAIN, "--config", _config_dir(t), "--out", o], "is a directory"),
    ("section_given_a_value", lambda t, o: [*TRAIN, "--set", "model=3", "--out", o],
     "model is a section, not a value: set one of its keys (style, hidden_size,"),
    # compare: every list of numbers, every run's config, before compare.json is written
    ("compare_lr_multiplier_nan", lambda t, o: [*COMPARE, "--lr-multipliers", "nan,1", "--out", o],
     "--lr-multipliers: lr_multipliers[0]=nan is not a finite number; use a number > 0"),
    ("compare_lr_multiplier_word", lambda t, o: [*COMPARE, "--lr-multipliers", "1,fast", "--out", o],
     "--lr-multipliers: lr_multipliers[1] takes a number, got 'fast'"),
    ("compare_seeds_zero", lambda t, o: [*COMPARE, "--seeds", "0", "--out", o], "--seeds: seeds=0 is out of range"),
    ("compare_set_inf", lambda t, o: [*COMPARE, "--set", "optim.lr=inf", "--out", o], "optim.lr=inf is not a finite number"),
    ("compare_variant_fractional_rank", lambda t, o: [*COMPARE, "--variants", "baseline,rank-4.5", "--out", o],
     "compare variant 'rank-4.5': sdmoe.rank takes an integer or a list of integers, got 4.5"),
    ("compare_split_after_end", lambda t, o: [*COMPARE, "--steps", "3", "--out", o],
     "sdmoe.split_step=5 is not before loop.steps=3"),
]


@pytest.mark.parametrize("case, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_exit_2_and_writes_nothing(case, argv, fragment, tmp_path, capsys):
    out = tmp_path / "out"
    args = argv(tmp_path, str(out))
    before = snapshot(tmp_path)
    assert main(args) == 2
    line = error_line(capsys)
    assert fragment in line, line
    assert not out.exists()  # nothing written: a retry with a good value is not refused
    assert snapshot(tmp_path) == before


def test_a_failed_seed_leaves_the_out_dir_free_for_the_retry(tmp_path, capsys):
    """`--seed -1` used to write run.json first, so the corrected command was refused."""
    out = str(tmp_path / "run")
    assert main([*TRAIN, "--seed", "-1", "--steps", "2", "--set", "loop.monitor_every=0", "--out", out]) == 2
    capsys.readouterr()
    assert main([*TRAIN, "--seed", "1", "--steps", "2", "--set", "loop.monitor_every=0", "--out", out]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["loop"]["seed"] == 1


def test_compare_help_shows_a_plain_percent(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "95% interval" in " ".join(text.split()) and "%%" not in text


# -- resume: the same run, or one line ------------------------------------------------------------------


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture()
def interrupted(tmp_path, tiny_config, tiny_dataset, one_thread):
    """A tiny baseline run of 10 steps stopped after 5 (checkpoint at 5), and the same run uninterrupted."""
    from sdmoe.train.loop import train

    tiny_config.loop.steps, tiny_config.loop.checkpoint_every = 10, 5
    train(tiny_config, tmp_path / "straight", progress=False, dataset=tiny_dataset)
    train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset, stop_after=5)
    return tmp_path / "run", tmp_path / "straight"


def test_resume_may_change_what_cannot_change_the_numbers(interrupted, tiny_config, tiny_dataset):
    """Logging, evaluation, monitoring, checkpoints kept, threads, nan policy, the name, and a
    baseline's unused sdmoe section: the resumed run ends with the uninterrupted run's weights."""
    from sdmoe.train.loop import train

    run, straight = interrupted
    lc = tiny_config.loop
    lc.log_every, lc.eval_every, lc.monitor_every, lc.monitor_rank = 1, 3, 2, 2
    lc.checkpoint_every, lc.keep_checkpoints, lc.threads, lc.nan_policy = 3, 5, 1, "skip"
    tiny_config.name, tiny_config.sdmoe.rank = "renamed", 4
    train(tiny_config, run, resume=True, progress=False, dataset=tiny_dataset)
    a, b = _weights(run), _weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "monitor" for e in events)  # the new settings did take effect


def test_resume_may_extend_the_run(interrupted, tiny_config, tiny_dataset):
    from sdmoe.train.loop import train

    run, _ = interrupted
    tiny_config.loop.steps = 12  # deliberate: the cosine schedule then spans 12 steps from step 5 on
    result = train(tiny_config, run, resume=True, progress=False, dataset=tiny_dataset)
    assert result.steps == 12 and json.loads((run / "run.json").read_text())["config"]["loop"]["steps"] == 12


@pytest.mark.parametrize("key, value, fragment", [
    ("optim.lr", 0.01, "different optim config than the run in"),
    ("loop.steps", 8, "loop.steps=8, but the run was written with loop.steps=10; a resume may not shorten it"),
    ("loop.seed", 3, "loop.seed=3, but the run was written with loop.seed=0"),
    ("loop.deterministic", False, "loop.deterministic=False, but the run was written with loop.deterministic=True"),
    ("data.seq_len", 16, "resume with --set data.seq_len=32, or start a new run in another --out"),
    ("model.aux_loss_coef", 0.1, "different model config"),
])
def test_resume_refuses_a_change_that_alters_the_trajectory(interrupted, tiny_config, tiny_dataset, key, value,
                                                            fragment):
    from sdmoe.train.config import set_value
    from sdmoe.train.loop import train

    run, _ = interrupted
    before = snapshot(run)
    set_value(tiny_config, key, value)
    with pytest.raises(UserError) as e:
        train(tiny_config, run, resume=True, progress=False, dataset=tiny_dataset)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert snapshot(run) == before


def test_resume_refusal_through_the_cli(interrupted, capsys):
    run, _ = interrupted
    argv = [*TRAIN, "--resume", "--steps", "10", "--set", "loop.monitor_every=0", "--set", "loop.checkpoint_every=5",
            "--set", "optim.lr=0.01", "--out", str(run)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"--resume with a different optim config than the run in {run}: optim.lr=0.01, but the run was written " \
           "with optim.lr=0.003" in line, line
