"""The experiment engine: train-or-resume, checks before the first write, one experiment per --out, the preset
registry and its old spellings, arms judged against a reference. Tiny runs of a few steps, or none."""

from __future__ import annotations

import json

import pytest

from sdmoe.cli import main
from sdmoe.errors import UserError
from sdmoe.experiments.arms import Arm, Arms
from sdmoe.experiments.engine import PlannedRun, Session, run_experiment, run_state
from sdmoe.experiments.presets import KINDS, PRESETS, configure, presets_of, rebuild_report, resolve
from sdmoe.experiments.runs import RUN_RECORD_FILE


def _tiny_run(run_id: str, steps: int = 4, **sets):
    from sdmoe.train.config import preset, set_value

    rc = preset("tiny")
    for key, value in {"loop.steps": steps, "loop.eval_every": 2, "loop.checkpoint_every": 2,
                       "loop.monitor_every": 0, "sdmoe.split_step": 1, **sets}.items():
        set_value(rc, key, value)
    return PlannedRun(run_id, rc, {"arm": run_id, "seed": 0})


def test_train_or_resume_skips_resumes_and_records(tmp_path, tiny_dataset):
    """A new run trains, a finished one is skipped (its files untouched), an interrupted one resumes from its
    last checkpoint, a diverged one is recorded and never retried, a started one with nothing to resume from
    starts clean; `max_runs` stops a session as an interrupted experiment would."""
    from sdmoe.train.loop import train

    done, partial, diverged, stale = (_tiny_run(n) for n in ("done", "partial", "diverged", "stale"))
    session = Session(tmp_path, max_runs=1)
    assert session.train(done)["action"] == "trained" and session.stopped
    assert session.train(partial) is None  # max_runs reached
    train(partial.config, tmp_path / partial.dir, progress=False, stop_after=2)
    assert run_state(tmp_path / partial.dir) == "partial"
    (tmp_path / diverged.dir).mkdir(parents=True)
    (tmp_path / diverged.dir / RUN_RECORD_FILE).write_text(json.dumps({"status": "diverged"}))
    (tmp_path / stale.dir).mkdir(parents=True)
    (tmp_path / stale.dir / "leftover.txt").write_text("x")
    before = (tmp_path / done.dir / "run.json").stat().st_mtime_ns
    session = Session(tmp_path)
    session.train_all([done, partial, diverged, stale], "test")
    assert [r["action"] for r in session.records] == ["skipped", "resumed", "skipped", "trained"]
    assert (tmp_path / done.dir / "run.json").stat().st_mtime_ns == before
    assert not (tmp_path / stale.dir / "leftover.txt").exists()
    record = json.loads((tmp_path / partial.dir / RUN_RECORD_FILE).read_text())
    assert record["status"] == "done" and record["resumes"] == 0 and record["arm"] == "partial"
    assert json.loads((tmp_path / partial.dir / "run.json").read_text())["status"] == "done"


def _state(root):
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command, preset, flags, fragment", [
    ("compare", "tiny", {"overrides": ["optim.lr=-1"]}, "optim.lr=-1.0 is out of range"),
    ("compare", "tiny", {"steps": 3}, "sdmoe.split_step=5 is not before loop.steps=3"),
    ("study", "study-tiny", {"overrides": ["sdmoe.rank=999"]}, "sdmoe.rank=999"),
    ("upcycle-compare", "upcycle-tiny", {"overrides": ["loop.parallel=fsdp"]}, "loop.parallel=fsdp needs"),
    ("finetune-compare", "finetune-tiny", {"overrides": ["optim.lr=-1"]}, "optim.lr=-1.0 is out of range"),
])
def test_every_experiment_checks_every_run_before_the_first_write(tmp_path, command, preset, flags, fragment):
    (tmp_path / "keep.txt").write_text("x")
    before = _state(tmp_path)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        run_experiment(configure(command, preset, flags), tmp_path / "a" / "out", progress=False)
    assert _state(tmp_path) == before


def test_one_experiment_per_out(tmp_path):
    """An --out holding one experiment's settings refuses another experiment, and other settings of the same."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"version": 1, "config": PRESETS["tiny"].build().to_dict()}))
    with pytest.raises(UserError, match="is not empty and holds no finetune compare"):
        run_experiment(configure("finetune-compare", "finetune-tiny", {}), out, progress=False)
    with pytest.raises(UserError, match="holds a compare with other settings"):
        run_experiment(configure("compare", "tiny", {"seeds": 3}), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["compare.json"]


def test_every_preset_builds_and_passes_its_checks(tmp_path):
    """Every preset of the registry: its command's experiment, and every run's config valid (nothing written)."""
    assert {p.command for p in PRESETS.values()} == set(KINDS)
    for p in PRESETS.values():
        experiment = configure(p.command, p.name, {})
        experiment.check(tmp_path / "never")
        assert p.about and type(experiment).command == p.command
    assert not (tmp_path / "never").exists()
    assert [p.name for p in presets_of("compare")] == ["demo", "demo-full", "lab", "paper", "tiny"]


def test_the_old_spelling_runs_the_new_commands_and_refuses_their_missing_flags():
    assert resolve("compare", "upcycle")[1].command == "upcycle-compare"
    assert type(configure("compare", "finetune-tiny", {"seeds": 2})).command == "finetune-compare"
    with pytest.raises(UserError, match=r"^--variants, --styles with --preset upcycle: its arms are fixed; drop them$"):
        configure("compare", "upcycle", {"variants": "baseline", "styles": "qwen2_moe"})
    with pytest.raises(UserError, match="--text with --preset finetune-tiny: its domains are the bundled ones"):
        configure("compare", "finetune-tiny", {"text": ["x"]})
    with pytest.raises(UserError, match="unknown upcycle-compare preset 'demo'; choose upcycle, upcycle-tiny$"):
        configure("upcycle-compare", "demo", {})
    with pytest.raises(UserError, match="unknown compare preset 'huge'; choose demo, demo-full, lab, paper, tiny; "
                                        "upcycle, finetune and methods have their own commands"):
        configure("compare", "huge", {})


def test_a_flag_a_command_lacks_is_a_usage_error(capsys):
    assert main(["upcycle-compare", "--variants", "baseline", "--out", "x"]) == 2
    assert "unrecognized arguments: --variants baseline" in capsys.readouterr().err


def test_report_names_a_directory_without_an_experiment(tmp_path):
    with pytest.raises(UserError, match="holds no experiment"):
        rebuild_report(tmp_path)


def test_arms_apply_their_transform_and_judge_against_the_reference():
    from sdmoe.train.config import preset

    arms = Arms((Arm("baseline"), Arm("sd-moe", {"method": "sd-moe"}), Arm("ortho", {"optim.lr": 1e-3})),
                reference="baseline")
    runs = arms.runs(2, lambda arm, seed: preset("tiny"))
    assert [r.run_id for r in runs] == ["baseline/seed0", "sd-moe/seed0", "ortho/seed0", "baseline/seed1",
                                        "sd-moe/seed1", "ortho/seed1", "baseline-rerun/seed0"]
    by = {r.run_id: r.config for r in runs}
    assert by["sd-moe/seed1"].method == "sd-moe" and by["ortho/seed0"].optim.lr == 1e-3
    assert by["baseline/seed0"].method == "baseline" and runs[-1].fields == {"arm": "baseline-rerun", "seed": 0}
    loss = {("baseline", 0): 4.0, ("baseline", 1): 4.2, ("baseline", 2): 4.1, ("sd-moe", 0): 3.9,
            ("sd-moe", 1): 4.05, ("sd-moe", 2): 3.98, ("ortho", 0): 4.1, ("ortho", 1): float("nan"),
            ("baseline-rerun", 0): 4.001}
    rows = {r["arm"]: r for r in arms.judge(loss, 3)}
    assert rows["baseline"]["reference"] and "gain" not in rows["baseline"]
    assert rows["sd-moe"]["per_seed"] == pytest.approx({0: 0.1, 1: 0.15, 2: 0.12})
    assert rows["sd-moe"]["verdict"] == "reproduced"  # better: the whole interval above 0
    assert rows["ortho"]["verdict"] == "not measurable" and "one pair" in rows["ortho"]["reason"]
    assert arms.same_seed_noise(loss) == pytest.approx(0.001)
    with pytest.raises(UserError, match="include the reference"):
        Arms((Arm("a"),), reference="b")


def test_an_arms_experiment_is_a_short_declaration(tmp_path):
    """What a new experiment (the next issue's remedies head-to-head) declares: its settings, its arms, a
    run's config; the engine checks, trains, resumes and judges every arm against the reference."""
    from dataclasses import dataclass

    from sdmoe.config_fields import setting
    from sdmoe.experiments.arms import ArmsExperiment
    from sdmoe.train.config import preset, set_value

    @dataclass
    class Settings:
        seeds: int = setting(2, ge=2)
        steps: int = setting(4, ge=1)

    class Remedies(ArmsExperiment):
        command, what, settings_file, settings = "remedies", "remedies compare", "remedies.json", Settings
        arms = Arms((Arm("baseline"), Arm("sd-moe", {"method": "sd-moe"}), Arm("slow", {"optim.lr": 1e-4})),
                    reference="baseline")

        def config_of(self, arm, seed, out, model=None):
            rc = preset("tiny")
            for key, value in {"loop.steps": self.config.steps, "loop.seed": seed, "sdmoe.split_step": 1,
                               "loop.monitor_every": 0, "loop.eval_every": 2}.items():
                set_value(rc, key, value)
            return rc

    result = run_experiment(Remedies(Settings()), tmp_path / "r", progress=False)
    assert [r["action"] for r in result.runs] == ["trained"] * 7
    table = result.summary["tables"]["final validation loss"]
    rows = {r["arm"]: r for r in table["rows"]}
    assert table["same_seed_noise"] == 0.0 and rows["baseline"]["reference"]
    assert rows["slow"]["gain"]["n"] == 2 and rows["slow"]["gain"]["mean"] < 0  # 30x the smaller rate: worse
    assert "| slow |" in result.text and (tmp_path / "r" / "remedies.md").read_text() == result.text
    again = run_experiment(Remedies(Settings()), tmp_path / "r", progress=False)
    assert {r["action"] for r in again.runs} == {"skipped"} and again.text == result.text
    with pytest.raises(UserError, match="holds a remedies compare with other settings"):
        run_experiment(Remedies(Settings(steps=5)), tmp_path / "r", progress=False)


def test_default_out_directories_are_the_ones_the_docs_name():
    from sdmoe.experiments.presets import default_out

    assert default_out("compare", "demo") == "runs/compare-demo" and default_out("study", "study") == "runs/study"
    assert default_out("upcycle-compare", "upcycle") == default_out("compare", "upcycle") == "runs/compare-upcycle"


def test_compare_flags_on_the_first_look():
    """--lr-multipliers on the first look (which sweeps no rate) sweeps its style; --text compares each of
    your domains alone, not the bundled drama."""
    from sdmoe.experiments.grid import plan

    cfg = configure("compare", "demo", {"lr_multipliers": "1,4"}).config
    assert {(s.variant, s.lr_mult) for s in plan(cfg) if s.lr_mult != 1} == {("baseline", 4.0), ("sd-moe", 4.0)}
    assert configure("compare", "demo", {"text": ["mine/"]}).config.per_text_domains == []
    assert configure("compare", "demo", {}).config.per_text_domains == ["drama"]
