"""`sdmoe methods-compare`: the remedies head to head, each arm at its own point of its grid, judged against plain."""

from __future__ import annotations

import json

import pytest

from sdmoe.cli import main
from sdmoe.errors import UserError
from sdmoe.experiments.engine import run_experiment
from sdmoe.experiments.methods import ARMS, MethodsCompare, Tuning, chosen_points, grid, search, tuned_points
from sdmoe.experiments.presets import PRESETS, configure
from sdmoe.experiments.runs import load_run


def _tiny(**kw):
    cfg = PRESETS["methods-tiny"].build()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_each_arm_has_its_grid_and_guos_arms_their_targets_too():
    cfg = _tiny(rates=[0.5, 1.0, 2.0], coefficients=[0.1, 1.0, 10.0])
    assert grid(cfg, ARMS["plain"]) == [Tuning(0.5), Tuning(1.0), Tuning(2.0)]
    assert grid(cfg, ARMS["sd-moe+ortho-var"])[-2:] == [Tuning(1.0, 0.1), Tuning(1.0, 10.0)]
    runs = {r.run_id: r.config for r in MethodsCompare(cfg).tuning_runs()}
    ortho = runs["tune/ortho-var/lr1-c10"]
    assert (ortho.aux.orthogonality, ortho.aux.variance) == pytest.approx((1e-3, 1e-1))  # 10x the authors'
    assert runs["tune/global-batch/lr2-c1"].optim.lr == pytest.approx(2 * cfg.lr)
    assert all(rc.loop.micro_batches == cfg.micro_batches for rc in runs.values())


def test_the_search_walks_off_the_grids_edge_to_a_tuned_point():
    def loss(p):  # lowest at 4x the rate and a hundredth of the targets
        return (p.rate - 4.0) ** 2 + (p.coef - 0.01) ** 2
    start = [Tuning(0.5), Tuning(1.0), Tuning(2.0), Tuning(1.0, 0.1), Tuning(1.0, 10.0)]
    points, best = search(start, loss, guo=False, extra=6)
    assert best == Tuning(4.0) and Tuning(8.0) in points  # 4x's neighbour ran, and lost
    assert all(p.coef == 1.0 for p in points[len(start):])  # without Guo's terms only the rate moves
    points, best = search(start, loss, guo=True, extra=20)
    assert best == Tuning(4.0, 0.01) and Tuning(4.0, 0.001) in points and Tuning(8.0, 0.01) in points
    points, best = search(start, loss, guo=True, extra=2)  # the budget ends it: the best of what ran
    assert len(points) == len(start) + 2 and best == min(points, key=loss)
    assert search(start, lambda p: float("nan") if p == Tuning(2.0) else loss(p), False, 6) == (start, None)
    assert search([Tuning(1.0)], lambda p: 1.0, guo=True, extra=0) == ([Tuning(1.0)], Tuning(1.0))  # no room: the start's best


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="unknown methods cell 'lab'"):
        run_experiment(MethodsCompare(_tiny(cells=["mix", "lab"])), tmp_path / "m", progress=False)
    with pytest.raises(UserError, match="methods domain 'poetry'"):
        run_experiment(MethodsCompare(_tiny(domain="poetry")), tmp_path / "m", progress=False)
    with pytest.raises(UserError, match="--styles with --preset methods-tiny: its arms are fixed"):
        configure("compare", "methods-tiny", {"styles": "qwen2_moe"})
    assert not (tmp_path / "m").exists()


def test_a_mix_cell_runs_every_arm_at_its_chosen_point_and_resumes(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["methods-compare", "--preset", "methods-tiny", "--quiet", "--out", str(out), "--set", "loop.threads=1"]
    cfg = _tiny(cells=["mix"], coefficients=[1.0], extra_points=0)  # one point an arm (the search: its own test)
    result = run_experiment(MethodsCompare(cfg), out, progress=False, device="cpu")
    chosen = chosen_points(out, cfg)
    for arm in ARMS.arms:  # the chosen point is the lowest final loss of the points its search ran
        points, _ = tuned_points(out, cfg, arm)
        losses = {p: load_run(out / "runs" / "tune" / arm.name / p.name)["final_mean"] for p in points}
        assert chosen[arm.name] == min(losses, key=losses.get)
    payload = json.loads((out / "methods.json").read_text())
    rows = {r["arm"]: r for r in payload["cells"]["mix"]["rows"]}
    assert set(rows) == {a.name for a in ARMS.arms} and rows["plain"]["reference"]
    assert rows["sd-moe"]["gain"]["n"] == 2 and "gain_figure" in rows["sd-moe"]  # paired over both seeds
    assert rows["plain"]["figures"]["steps to plain's loss"]["mean"] == pytest.approx(1.0)  # reaches itself at the end
    assert payload["cells"]["mix"]["same_seed_noise"] is not None
    assert payload["when"][0].startswith("a new model on mixed text:")
    # the mix cell's seed 0 is the grid's run at the chosen point: trained once
    trained = {r["run_id"] for r in result.runs if r["action"] == "trained"}
    assert not any(rid.startswith("mix/") and rid.endswith("/seed0") and "rerun" not in rid for rid in trained)
    md = (out / "methods.md").read_text()
    assert "| ortho-var |" in md and "**In short.** A new model on mixed text:" in md.split("## ")[0]  # the headline
    # the same command again: every run finished, nothing trained
    again = run_experiment(MethodsCompare(cfg), out, progress=False, device="cpu")
    assert {r["action"] for r in again.runs} == {"skipped"}
    capsys.readouterr()
    assert main(["report", str(out)]) == 0 and "Which method when" in capsys.readouterr().out
    assert main([*argv, "--steps", "9"]) == 2  # other settings into the same --out: refused in one line


@pytest.mark.slow
def test_the_tiny_preset_runs_every_cell_from_scratch_and_upcycled(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["compare", "--preset", "methods-tiny", "--quiet", "--out", str(out), "--set", "loop.threads=1"]) == 0
    payload = json.loads((out / "methods.json").read_text())
    assert set(payload["cells"]) == {"mix", "copy", "btx"}
    btx = json.loads((out / "checkpoints" / "btx-seed0" / "config.json").read_text())
    assert btx["num_local_experts"] == 3  # one expert per domain's fine-tune
    for cell in ("copy", "btx"):
        assert all(r["gain"]["n"] == 2 for r in payload["cells"][cell]["rows"] if not r["reference"])
    cfg = PRESETS["methods-tiny"].build()
    for t in payload["tuning"]:  # every search went past its one-rate grid to a point whose neighbours all ran
        arm = ARMS[t["arm"]]
        points, chosen = tuned_points(out, cfg, arm)
        assert len(t["points"]) == len(points) > len(grid(cfg, arm)) and chosen == Tuning(**t["chosen"])
        for p in points:
            assert (out / "runs" / "tune" / arm.name / p.name / "run.json").is_file()
