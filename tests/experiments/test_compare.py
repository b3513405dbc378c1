"""End to end on the tiny preset: interrupted compare, resume, skip, report, rebuild, refusal (slow tier: the
default tier's end-to-end compare is tests/test_cli.py's, its resume rules tests/experiments/test_engine.py's)."""

import json
from html import escape

import pytest

from sdmoe.errors import UserError
from sdmoe.experiments.compare import rebuild_report, run_compare
from sdmoe.experiments.grid import CompareConfig, plan
from sdmoe.train.loop import train


def _cfg(**kw):
    base = dict(preset="tiny", styles=["qwen2_moe"], seeds=2, variants=["baseline", "sd-moe"],
                lr_multipliers=[1.0], lr_sweep_styles=0, analyze=True, steps=10,
                overrides=["sdmoe.split_step=4", "loop.eval_every=5", "loop.log_every=2",
                           "loop.monitor_every=5", "loop.checkpoint_every=5"], timing_processes=2, timing_rounds=3)
    base.update(kw)
    return CompareConfig(**base)


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, tiny_dataset):
    cfg, out = _cfg(), tmp_path / "cmp"
    specs = plan(cfg)
    assert [s.run_id for s in specs] == ["qwen2_moe/baseline/lr1/seed0", "qwen2_moe/sd-moe/lr1/seed0",
                                         "qwen2_moe/baseline/lr1/seed1", "qwen2_moe/sd-moe/lr1/seed1",
                                         "qwen2_moe/baseline-rerun/lr1/seed0"]

    # An interrupted compare: one run finished, the next one stopped half-way.
    first = run_compare(cfg, out, progress=False, max_runs=1)
    assert [r["action"] for r in first.runs] == ["trained"]
    partial = out / "runs" / specs[1].run_id
    train(specs[1].run_config(cfg), partial, progress=False, stop_after=5)
    assert json.loads((partial / "run.json").read_text())["status"] == "running"
    done_file = out / "runs" / specs[0].run_id / "run.json"
    mtime = done_file.stat().st_mtime_ns

    second = run_compare(cfg, out, progress=False)
    assert [r["action"] for r in second.runs] == ["skipped", "resumed", "trained", "trained", "trained"]
    assert done_file.stat().st_mtime_ns == mtime
    for s in specs:
        assert json.loads((out / "runs" / s.run_id / "run.json").read_text())["status"] == "done"
        assert (out / "runs" / s.run_id / "analysis.json").is_file()

    html = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert html.split("<body>", 1)[1].startswith(f'<p class="headline">{escape(summary["headline"])}</p>')
    assert second.text.splitlines()[0] == summary["headline"]
    assert "Claims" in html and "SD-MoE lowers validation loss" in html
    assert 'class="badge' in html and "data:image/png;base64," in html
    assert [c["claim"] for c in summary["claims"]] == list("abcdefg")
    a = summary["claims"][0]
    assert a["n"] == 2 and a["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    # three domains (the bundled corpora), analysis on: (d) is measured
    assert summary["claims"][3]["n"] == 2 and len(summary["claims"][3]["domains"]) > 1
    assert set(a["per_pair"]) == {"qwen2_moe/seed0", "qwen2_moe/seed1"}
    assert summary["claims"][2]["n"] == 2  # tails' overlap from the trainer's monitor records
    params = {r["variant"]: r for r in summary["parameters"]}
    assert params["baseline"]["added"] == 0 and params["sd-moe"]["while_training"] is not None
    assert (out / "summary.csv").read_text().count("\n") == 6
    # Fixed threads and deterministic algorithms: a same-seed rerun is the same run, bit for bit.
    assert a["same_seed_noise"] == 0.0
    # claim (e) from interleaved rounds in two fresh processes, on both clocks
    timing = json.loads((out / "timing.json").read_text())["qwen2_moe"]
    assert len(timing["processes"]) == 2
    for proc in timing["processes"]:
        assert {len(proc[clock][side]) for clock in ("wall", "cpu") for side in ("baseline", "sd-moe")} == {3}
        assert proc["device"] == "cpu"  # the runs' own device
    e = summary["claims"][4]
    assert e["n"] == 2 and e["clock"] in ("wall", "cpu") and e["verdict"] != "not measurable"
    assert set(e["sides"]["qwen2_moe"]) == {"baseline", "sd-moe"}
    assert "(a)" in second.text

    third = run_compare(cfg, out, progress=False)
    assert {r["action"] for r in third.runs} == {"skipped"}

    # The report is a pure function of the run files.
    before = (out / "summary.json").read_text()
    for name in ("report.html", "summary.json", "summary.csv"):
        (out / name).unlink()
    text = rebuild_report(out)
    assert "(g)" in text and (out / "report.html").is_file()
    assert (out / "summary.json").read_text() == before

    with pytest.raises(UserError, match="other settings"):
        run_compare(_cfg(seeds=3), out, progress=False)


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no compare"):
        run_compare(_cfg(), tmp_path, progress=False)


@pytest.mark.slow
def test_compare_runs_the_papers_own_split_beside_the_default(tmp_path, tiny_dataset):
    cfg = _cfg(seeds=1, variants=["baseline", "sd-moe", "paper", "control"], analyze=False, steps=8,
               timing_processes=0)
    result = run_compare(cfg, tmp_path / "cmp", progress=False)
    assert {r["action"] for r in result.runs} == {"trained"}
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert {r["variant"] for r in summary["parameters"]} >= {"baseline", "sd-moe", "paper", "control"}
    assert "paper" in (tmp_path / "cmp" / "report.html").read_text()
    run = json.loads((tmp_path / "cmp" / "runs" / "qwen2_moe" / "paper" / "lr1" / "seed0" / "run.json").read_text())
    sd = run["config"]["sdmoe"]
    assert (sd["projection_sides"], sd["basis_source"], sd["refresh_every"], sd["rank"]) == ("two", "shared", 16, 8)


def test_a_compare_saved_before_the_timing_settings_still_resumes(tmp_path):
    from sdmoe.experiments.engine import claim_out_dir as claim

    def claim_out_dir(out, cfg):
        return claim(out, cfg, "compare.json", "compare")

    cfg = _cfg()
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("timing_")}
    (tmp_path / "compare.json").write_text(json.dumps({"version": 1, "config": old}))
    # No run depends on the timing settings: a resume may change them (the new values are kept)...
    claim_out_dir(tmp_path, cfg)
    assert json.loads((tmp_path / "compare.json").read_text())["config"]["timing_processes"] == 2
    # ... but not a setting the runs depend on
    with pytest.raises(UserError, match="other settings"):
        claim_out_dir(tmp_path, _cfg(seeds=3))


@pytest.mark.slow
def test_per_text_compares_each_domain_and_opens_the_report_with_the_gain_per_text(tmp_path):
    """`per_text`: a sub-compare per domain of the text, and the report's first section the gain per text,
    with every run's passes over its data."""
    from sdmoe.data.corpus import load_bundled

    text = tmp_path / "text"
    for doc in load_bundled():
        if doc.domain in ("drama", "fairy_tales"):
            (text / doc.domain).mkdir(parents=True, exist_ok=True)
            (text / doc.domain / "part.txt").write_text(doc.text[:40_000])
    cfg = _cfg(text=[str(text / "drama"), str(text / "fairy_tales")], per_text=True, analyze=False,
               timing_processes=0)
    result = run_compare(cfg, tmp_path / "cmp", progress=False)
    out = tmp_path / "cmp"
    for domain in ("drama", "fairy_tales"):
        sub = json.loads((out / "texts" / domain / "summary.json").read_text())
        assert sub["n_done"] == 4  # 2 seeds x baseline, sd-moe
        run = json.loads((out / "texts" / domain / "runs" / "qwen2_moe" / "baseline" / "lr1" / "seed0" /
                          "run.json").read_text())
        assert run["config"]["data"]["domains"] == [domain]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["text"]: r for r in summary["per_text"]}
    assert list(rows) == ["all domains (the mix)", "drama", "fairy_tales"]
    for r in rows.values():
        assert r["n"] == 2 and r["passes"] > 0 and r["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    # a domain alone holds fewer tokens than the mix: the same steps make more passes over it
    assert rows["drama"]["passes"] > rows["all domains (the mix)"]["passes"]
    lines = result.text.splitlines()
    assert lines[1] == summary["per_text_sentence"] and "(qwen2_moe, 2 paired seeds" in lines[1]
    html = (out / "report.html").read_text()
    assert html.index("Gain per text") < html.index("Claims") and "passes" in html


def test_the_per_text_sentence_says_where_sd_moe_helped(tmp_path):
    from sdmoe.experiments.compare import per_text_rows

    def runs(gains):
        out = []
        for seed, g in enumerate(gains):
            for variant, loss in (("baseline", 4.0), ("sd-moe", 4.0 - g)):
                out.append({"style": "qwen2_moe", "variant": variant, "lr_mult": 1.0, "status": "done", "seed": seed,
                            "final_mean": loss, "passes": 0.3, "train_tokens": 1000})
        return out

    cfg = CompareConfig(styles=["qwen2_moe"], seeds=3)
    rows, sentence = per_text_rows(tmp_path, cfg, {"runs": runs([0.10, 0.12, 0.11])})
    assert rows[0]["verdict"] == "reproduced"
    assert sentence.startswith("SD-MoE lowered the validation loss on all domains (the mix) (+0.110 [")
    assert sentence.endswith("(qwen2_moe, 3 paired seeds, train preset demo).")
    rows, sentence = per_text_rows(tmp_path, cfg, {"runs": runs([0.01, -0.02, 0.005])})
    assert sentence.startswith("SD-MoE made no difference beyond the seed-to-seed noise on all domains (the mix)")
    rows, sentence = per_text_rows(tmp_path, cfg, {"runs": runs([0.01])})
    assert rows[0]["verdict"] == "not measurable" and "too few finished pairs" in sentence


def test_run_state_reads_train_s_run_record(tmp_path):
    from sdmoe.experiments.compare import run_state

    run = tmp_path / "run"
    assert run_state(run) == "new"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"method": "baseline"}, "status": "done"}))
    assert run_state(run) == "done"
    (run / "run.json").write_text("[1, 2]")  # JSON, but no run record: never read as "new" (its directory is cleared)
    with pytest.raises(UserError, match=r"run.json holds no run config; delete .*run to train that run again"):
        run_state(run)
    (run / "compare_run.json").write_text(json.dumps({"status": "diverged"}))
    assert run_state(run) == "diverged"
