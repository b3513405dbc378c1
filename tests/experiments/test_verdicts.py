"""Each verdict rule of the compare on synthetic run files and timing samples: nothing trains, nothing is timed."""

import json
import math
import re

import pytest

from sdmoe.experiments import stats
from sdmoe.experiments.claims import (
    CLAIMS,
    CLAIMS_BY_KEY,
    Paired,
    gain_figure,
    interval_figure,
    judge,
    step_time_claim,
    summarize,
    summary_text,
    text_gain_row,
)
from sdmoe.experiments.grid import CompareConfig, plan
from sdmoe.report.compare import per_pair_matrix, write_report

STEPS = 100


def _cfg(**kw):
    base = dict(preset="tiny", styles=["qwen2_moe"], seeds=3, variants=["baseline", "sd-moe", "control"],
                lr_multipliers=[1.0], lr_sweep_styles=0, analyze=True, rerun_baseline=False, timing_processes=0)
    base.update(kw)
    return CompareConfig(**base)


def _final(spec) -> float:
    """A made-up final loss: SD-MoE 0.04-0.06 below the baseline, the control 0.015-0.025 above it; at 4x the
    rate the baseline loses 0.3 nats, SD-MoE 0.15."""
    gain = {"sd-moe": -0.05 + 0.01 * ((7 * spec.seed) % 3 - 1), "control": 0.02 + 0.005 * ((5 * spec.seed) % 3 - 1)}
    loss = 4.5 + 0.01 * spec.seed + gain.get(spec.variant, 0.0)
    return loss + 0.1 * (spec.lr_mult - 1) * (0.5 if spec.variant == "sd-moe" else 1.0)


def fake_compare(out, cfg, domains=("drama", "tales"), k_over_d=0.0625, tails=None, mi=None, final=_final):
    """Run files for every run of `plan(cfg)`, as `train` and `analyze_run` would write them."""
    for spec in plan(cfg):
        d = out / "runs" / spec.run_id
        d.mkdir(parents=True)
        loss = final(spec)
        method = "baseline" if spec.variant.startswith("baseline") else "sd-moe"
        config = {"method": method, "loop": {"steps": STEPS, "log_every": 10}, "optim": {"lr": 3e-3 * spec.lr_mult},
                  "sdmoe": {"split_step": 5}}
        (d / "run.json").write_text(json.dumps({"status": "done", "config": config,
                                                "val_loss": {"mean": loss, **{x: loss for x in domains}}}))
        records = [{"event": "eval", "step": s, "val": {"mean": loss + 0.5 * (STEPS - s) / STEPS}}
                   for s in (50, STEPS)]
        records += [{"step": s, "step_time": 0.01, "loss": loss} for s in range(10, STEPS + 1, 10)]
        monitor = {"event": "monitor", "step": STEPS, "param_overlap/mean": 0.3, "overlap_baseline": k_over_d}
        if method == "sd-moe" and tails is not None:
            monitor["sdmoe"] = {"tails_overlap/mean": tails[spec.seed]}
        records.append(monitor)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        if cfg.analyze and mi is not None:
            (d / "analysis.json").write_text(json.dumps({"functional": [
                {"domain_mi_normalized": mi(spec), "shared_experts": []}]}))
    return summarize(out, cfg)


def _claim(summary, key):
    return next(c for c in summary["claims"] if c["claim"] == key)


def test_judge_rules():
    iv, v, why = judge({}, 0.0, +1, "no runs yet")
    assert (v, why, iv["n"]) == (stats.NOT_MEASURABLE, "no runs yet", 0)
    iv, v, why = judge({"s/seed0": 0.1}, 0.0, +1, "-")
    assert v == stats.NOT_MEASURABLE and "one pair (s/seed0)" in why and math.isnan(iv["lo"])
    # Pairs that agree exactly: never an interval of zero width, and no verdict from it.
    iv, v, why = judge({"a": 0.0, "b": 0.0, "c": 0.0}, 0.0, +1, "-")
    assert v == stats.NOT_MEASURABLE and "no spread" in why and math.isnan(iv["lo"]) and math.isnan(iv["hi"])
    assert judge({"a": 0.1, "b": 0.12, "c": 0.09}, 0.0, +1, "-")[1:] == (stats.REPRODUCED, "")
    assert judge({"a": -0.1, "b": -0.12, "c": -0.09}, 0.0, +1, "-")[1] == stats.NOT_REPRODUCED
    assert judge({"a": -0.1, "b": 0.12, "c": 0.0}, 0.0, +1, "-")[1] == stats.INCONCLUSIVE


def test_each_claim_is_a_function_of_the_paired_runs(tmp_path):
    cfg = _cfg(lr_multipliers=[1.0, 4.0], lr_sweep_styles=1, lr_sweep_seeds=2)
    s = fake_compare(tmp_path, cfg, tails=[0.05, 0.06, 0.055], mi=lambda sp: 0.1 * sp.seed)
    assert [c["claim"] for c in s["claims"]] == [c.key for c in CLAIMS] == list("abcdefg")
    paired = Paired.read(tmp_path, cfg)
    # a claim's row needs nothing but the paired runs: the summary's table is the claims, one by one
    assert [claim.row(paired) for claim in CLAIMS] == s["claims"]
    assert paired.final("qwen2_moe", "baseline", 1) == pytest.approx(_final(next(
        sp for sp in plan(cfg) if sp.variant == "baseline" and sp.seed == 1 and sp.lr_mult == 1.0)))
    assert paired.run("qwen2_moe", "sd-moe", 0, 4.0)["lr_mult"] == 4.0
    assert paired.run("qwen2_moe", "sd-moe", 2, 4.0) is None  # the sweep ran two seeds
    assert set(paired.paired("baseline", "sd-moe")) == {f"qwen2_moe/seed{i}" for i in range(3)}


def test_figures_say_why_there_is_no_interval():
    assert interval_figure({"n": 0}) == "no data" and gain_figure({}) == "-"
    one = {"mean": 0.06, "lo": math.nan, "hi": math.nan, "n": 1, "std": math.nan}
    assert interval_figure(one, unit=" nats") == "0.060 nats (n=1, no interval)"
    assert gain_figure(one) == "+0.060 (one pair, no interval)" and gain_figure(one, one="1 seed") == "+0.060 (1 seed)"
    flat = {"mean": 0.5, "lo": math.nan, "hi": math.nan, "n": 3, "std": 0.0}
    assert gain_figure(flat) == "+0.500 in all 3 pairs (no spread, no interval)"  # never "[+nan, +nan]"
    iv = {"mean": 0.05, "lo": 0.025, "hi": 0.075, "n": 3, "std": 0.01}
    assert interval_figure(iv, unit="x") == "0.050x [0.025, 0.075] (n=3)"
    assert gain_figure(iv) == "+0.050 [+0.025, +0.075]"


def test_the_gain_per_text_is_judged_like_the_claims():
    def runs(gains):
        return [{"style": "qwen2_moe", "variant": variant, "lr_mult": 1.0, "status": "done", "seed": seed,
                 "final_mean": loss, "passes": 0.3, "train_tokens": 1000}
                for seed, g in enumerate(gains)
                for variant, loss in (("baseline", 4.0 + seed), ("sd-moe", 4.0 + seed - g))]

    row = text_gain_row("mix", runs([0.10, 0.12, 0.11]), "qwen2_moe")
    assert (row["verdict"], row["n"], row["passes"]) == (stats.REPRODUCED, 3, 0.3)
    assert row["figure"].startswith("+0.110 [") and row["badge"] == "pass"
    # three seeds that agree to the last bit give no interval, as in the claims table: not measurable
    row = text_gain_row("mix", runs([0.5, 0.5, 0.5]), "qwen2_moe")
    assert row["verdict"] == stats.NOT_MEASURABLE and "nan" not in row["figure"]
    assert text_gain_row("mix", [], "qwen2_moe")["figure"] == "-"


def test_a_tested_compare_gives_verdicts_and_a_headline(tmp_path):
    s = fake_compare(tmp_path, _cfg(), tails=[0.05, 0.06, 0.055], mi=lambda sp: 0.3 if sp.variant == "sd-moe" else
                     0.2 + 0.01 * sp.seed)
    v = {c["claim"]: c["verdict"] for c in s["claims"]}
    assert v["a"] == stats.REPRODUCED and v["g"] == stats.REPRODUCED and v["c"] == stats.REPRODUCED
    assert v["d"] == stats.REPRODUCED
    assert _claim(s, "a")["reason"] == "" and _claim(s, "a")["lo"] > 0
    # (e) and (f) cannot be tested by this compare: each says why.
    assert v["e"] == stats.NOT_MEASURABLE and "timing_processes = 0" in _claim(s, "e")["reason"]
    assert v["f"] == stats.NOT_MEASURABLE and "no 4x" in _claim(s, "f")["reason"]
    # The headline is computed from those verdicts, and is the first line of the terminal summary.
    head = s["headline"]
    assert summary_text(s).splitlines()[0] == head and head.count(". ") == 0 and head.endswith(".")
    reproduced = sorted(k for k, x in v.items() if x == stats.REPRODUCED)
    assert f"{len(reproduced)} of 7 of the paper's claims reproduced ({', '.join(reproduced)})" in head
    assert "2 not measurable (e, f)" in head and "train preset tiny" in head and "lr 0.003" in head
    assert f"{_claim(s, 'a')['mean']:+.3f} nats" in head


def test_one_domain_makes_specialisation_not_measurable(tmp_path):
    # One user domain: I(expert; domain) is 0 for both sides, so every pair's difference is exactly 0.
    s = fake_compare(tmp_path, _cfg(), domains=("mytext",), mi=lambda sp: 0.0)
    d = _claim(s, "d")
    assert d["verdict"] == stats.NOT_MEASURABLE and "one domain in the text (mytext)" in d["reason"]
    assert d["lo"] is None or math.isnan(d["lo"])  # no [0.000, 0.000]
    assert "[0.000, 0.000]" not in d["figure"]
    assert re.search(r"\d not measurable \([a-g, ]*d[a-g, ]*\)", s["headline"])


def test_one_seed_gives_no_interval(tmp_path):
    s = fake_compare(tmp_path, _cfg(seeds=1), tails=[0.05], mi=lambda sp: 0.1)
    for key in "acdg":
        c = _claim(s, key)
        assert c["verdict"] == stats.NOT_MEASURABLE and "one pair (qwen2_moe/seed0)" in c["reason"], key


def test_random_overlap_above_the_threshold_leaves_c_not_measurable(tmp_path):
    # k/d = 0.125 >= 0.1: tails above 0.1 say nothing about the method; the gap to the baseline still counts.
    s = fake_compare(tmp_path / "x", _cfg(), k_over_d=0.125, tails=[0.12, 0.13, 0.125])
    c = _claim(s, "c")
    assert c["verdict"] == stats.NOT_MEASURABLE and "k/d = 0.125 >= 0.1" in c["reason"]
    # ... unless they are below it all the same
    s = fake_compare(tmp_path / "y", _cfg(), k_over_d=0.125, tails=[0.05, 0.06, 0.055])
    assert _claim(s, "c")["verdict"] == stats.REPRODUCED
    # ... and a gap the wrong way is a plain "not reproduced", whatever k/d
    s = fake_compare(tmp_path / "z", _cfg(), k_over_d=0.125, tails=[0.4, 0.45, 0.42])
    assert _claim(s, "c")["verdict"] == stats.NOT_REPRODUCED


def test_the_4x_rate_claim(tmp_path):
    cfg = _cfg(lr_multipliers=[1.0, 4.0], lr_sweep_styles=1, lr_sweep_seeds=2)
    f = _claim(fake_compare(tmp_path / "two", cfg), "f")
    # the made-up baseline loses 0.3 nats going to 4x, SD-MoE 0.15: a steady 0.15 gap gives no spread...
    assert f["verdict"] == stats.NOT_MEASURABLE and "no spread" in f["reason"]

    def jitter(spec):
        return _final(spec) + (0.01 * spec.seed if spec.lr_mult == 4.0 and spec.variant == "baseline" else 0.0)

    f = _claim(fake_compare(tmp_path / "jitter", cfg, final=jitter), "f")
    assert f["verdict"] == stats.REPRODUCED and f["n"] == 2
    f = _claim(fake_compare(tmp_path / "one", _cfg(lr_multipliers=[1.0, 4.0], lr_sweep_styles=1)), "f")
    assert f["verdict"] == stats.NOT_MEASURABLE and "lr_sweep_seeds" in f["reason"]


def test_never_reaching_the_baseline_is_not_reproduced(tmp_path):
    def flat(spec):  # SD-MoE ends above the baseline in every pair: the ratio is a lower bound of 1.0 each time
        return 4.5 + (0.05 if spec.variant == "sd-moe" else 0.0)

    b = _claim(fake_compare(tmp_path, _cfg(), final=flat), "b")
    assert b["verdict"] == stats.NOT_REPRODUCED and b["unreached"] == 3 and "[1.000, 1.000]" not in b["figure"]


# -- claim (e) from synthetic timing samples --------------------------------------------------


def _process(ratio, base_ms, jitter, rounds=6, cpu_jitter=None):
    """One process's per-round medians: the baseline's rounds move by +-jitter (relative), SD-MoE's with them."""
    wobble = [(-1) ** j * jitter * (j % 3) / 2 for j in range(rounds)]
    base = [base_ms * 1e-3 * (1 + w) for w in wobble]
    out = {"wall": {"baseline": base, "sd-moe": [b * ratio for b in base]}}
    cj = jitter if cpu_jitter is None else cpu_jitter
    cbase = [base_ms * 1e-3 * (1 + (-1) ** j * cj * (j % 3) / 2) for j in range(rounds)]
    out["cpu"] = {"baseline": cbase, "sd-moe": [b * ratio for b in cbase]}
    return out


def _sample(ratios, jitter, **kw):
    return {"version": 2, "rounds": 6, "steps_per_round": 8,
            "processes": [_process(r, 12.0, jitter, **kw) for r in ratios]}


E = CLAIMS_BY_KEY["e"]


def test_step_time_reproduced_when_the_machine_is_quiet():
    c = step_time_claim({"qwen2_moe": _sample([1.01, 1.015, 1.02, 1.012], 0.01)}, E)
    assert c["verdict"] == stats.REPRODUCED and c["n"] == 4 and not c["noise_limited"]
    assert c["hi"] < E.threshold and c["noise"] < E.threshold - c["mean"]
    assert set(c["per_pair"]) == {f"qwen2_moe/process{i}" for i in range(1, 5)}
    # the report prints each side's own spread beside the ratio, and the clock
    assert "baseline 12.00 ms [" in c["figure"] and "sd-moe" in c["figure"] and "4 processes" in c["figure"]


def test_step_time_inconclusive_when_noise_exceeds_the_margin():
    # The same paired ratios, well inside 1.05 by their interval, but each side's own step time moves
    # +-12% from round to round: wider than the 0.035 to the threshold, so a rerun may cross it.
    c = step_time_claim({"qwen2_moe": _sample([1.01, 1.015, 1.02, 1.012], 0.24)}, E)
    assert c["hi"] < E.threshold  # the interval alone would say "reproduced"
    assert c["verdict"] == stats.INCONCLUSIVE and c["noise_limited"]
    assert c["noise"] > E.threshold - c["mean"] and "wider than the ratio's distance" in c["reason"]
    # the same holds on the other side of the threshold
    c = step_time_claim({"qwen2_moe": _sample([1.09, 1.1, 1.095], 0.3)}, E)
    assert c["lo"] > E.threshold and c["verdict"] == stats.INCONCLUSIVE
    assert step_time_claim({"qwen2_moe": _sample([1.09, 1.1, 1.095], 0.02)}, E)["verdict"] == stats.NOT_REPRODUCED


def test_step_time_uses_cpu_time_where_wall_time_is_noisier():
    c = step_time_claim({"qwen2_moe": _sample([1.01, 1.015, 1.02], 0.3, cpu_jitter=0.01)}, E)
    assert c["clock"] == "cpu" and "process CPU time" in c["figure"] and c["verdict"] == stats.REPRODUCED
    c = step_time_claim({"qwen2_moe": _sample([1.01, 1.015, 1.02], 0.01, cpu_jitter=0.3)}, E)
    assert c["clock"] == "wall" and "wall time" in c["figure"]


def test_step_time_on_a_gpu_is_judged_by_wall_time():
    # CPU time steadier, but the processes ran on a GPU: the host's CPU time is not the step's work
    sample = _sample([1.01, 1.015, 1.02], 0.3, cpu_jitter=0.01)
    for proc in sample["processes"]:
        proc["device"] = "cuda:0"
    c = step_time_claim({"qwen2_moe": sample}, E)
    assert c["clock"] == "wall" and "wall time" in c["figure"]


def test_step_time_from_a_timing_file_of_one_process():
    # timing.json from before samples had processes: one process, wall time, the interval over its rounds
    legacy = {"baseline": [0.010, 0.011, 0.0105, 0.0102, 0.0108], "sd-moe": [0.0104, 0.0113, 0.0109, 0.0105, 0.0111]}
    c = step_time_claim({"qwen2_moe": legacy}, E)
    assert c["n"] == 5 and c["clock"] == "wall" and "rounds of one process" in c["note"]
    assert c["verdict"] in stats.VERDICTS


def test_per_pair_matrix_has_pairs_as_rows_and_claims_as_columns(tmp_path):
    s = fake_compare(tmp_path, _cfg(), tails=[0.05, 0.06, 0.055], mi=lambda sp: 0.1 * sp.seed)
    s["claims"][4] = step_time_claim({"qwen2_moe": _sample([1.01, 1.02], 0.01)}, E)
    rows = per_pair_matrix(s["claims"])
    assert [r["pair"] for r in rows] == ["qwen2_moe/seed0", "qwen2_moe/seed1", "qwen2_moe/seed2",
                                         "qwen2_moe/process1", "qwen2_moe/process2", "verdict"]
    a_col = "(a) loss, baseline - SD-MoE (nats)"
    assert list(rows[0])[:2] == ["pair", a_col] and "(c) gap, baseline experts - tails" in rows[0]
    assert rows[0][a_col] == pytest.approx(_claim(s, "a")["per_pair"]["qwen2_moe/seed0"])
    assert rows[3]["(e) step time, SD-MoE / baseline"] == pytest.approx(1.01) and rows[3][a_col] is None
    # the report opens on the headline, above the title
    html = write_report(tmp_path, s).read_text()
    body = html.split("<body>", 1)[1]
    assert body.startswith('<p class="headline">SD-MoE vs the plain MoE (train preset tiny')
    assert "<h3>Per pair</h3>" in html and "(g) loss, control - SD-MoE (nats)" in html


def test_a_claim_that_states_a_number_is_reproduced_only_near_it():
    sized = lambda lo, hi: stats.sized_verdict(lo, hi, 1.0, -1, 0.7, 0.1)  # noqa: E731 - claim (b)'s rule
    assert sized(0.65, 0.75) == stats.REPRODUCED
    assert sized(0.978, 0.999) == stats.NOT_AS_STATED  # the demo's 0.989x: fewer steps, not ~0.7x
    assert sized(0.3, 0.5) == stats.NOT_AS_STATED  # far fewer: still not the stated number
    assert sized(0.7, 0.9) == stats.INCONCLUSIVE  # reaches into the band and out of it
    assert sized(0.9, 1.1) == stats.INCONCLUSIVE and sized(1.05, 1.2) == stats.NOT_REPRODUCED  # direction first
    assert stats.BADGE[stats.NOT_AS_STATED] == "warn"


def test_fewer_steps_far_from_the_papers_number_gets_its_own_words(tmp_path):
    # the fake runs cross the baseline's final loss at ~0.9 of the steps (gain 0.04-0.06 nats)
    s = fake_compare(tmp_path / "far", _cfg(), tails=[0.05, 0.06, 0.055])
    b = _claim(s, "b")
    assert b["verdict"] == stats.NOT_AS_STATED and 0.8 < b["lo"] < b["hi"] < 1.0, b["figure"]
    assert "fewer steps, not ~0.7x" in b["reason"] and "(b: fewer steps, not ~0.7x)" in s["headline"]
    assert "reproduced (a, c, g)" in s["headline"]  # b is not among them

    def near(spec):  # SD-MoE 0.15 nats below: its curve crosses the baseline's final loss at ~0.7 of the steps
        return 4.5 + 0.01 * spec.seed - (0.15 + 0.004 * (spec.seed - 1) if spec.variant == "sd-moe" else 0.0)

    b = _claim(fake_compare(tmp_path / "near", _cfg(), final=near), "b")
    assert b["verdict"] == stats.REPRODUCED and 0.6 <= b["lo"] < b["hi"] <= 0.8, b["figure"]
