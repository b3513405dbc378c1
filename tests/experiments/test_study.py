"""`sdmoe study`: its grid of cells, the passes-over-data figure, and the tables it reads from run files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdmoe.cli import main
from sdmoe.data.dataset import passes_over_data, select_domains, truncate_tokens
from sdmoe.errors import UserError
from sdmoe.experiments.grid import plan
from sdmoe.experiments.study import (
    BASE_STEPS,
    TOKENS_PER_STEP,
    cell_result,
    cells,
    demo_parameters,
    study_markdown,
    write_study,
)
from sdmoe.train.config import preset


def test_the_text_factor_changes_only_the_text():
    text = cells("text")
    assert [c.text for c in text] == ["drama", "encyclopedia", "fairy_tales", "mix"]
    configs = [c.compare_config(3) for c in text]
    assert all(c.variants == ["baseline", "sd-moe", "control"] and c.seeds == 3 for c in configs)
    # one override differs between cells, and it is the text
    shared = set(configs[0].overrides) & set(configs[1].overrides)
    assert set(configs[0].overrides) - shared == {"data.domains=drama"}
    assert not any(o.startswith("data.domains") for o in configs[3].overrides)  # the mix: every domain
    specs = plan(configs[0])  # every run of the cell validates before anything trains
    assert {s.variant for s in specs} == {"baseline", "sd-moe", "control", "baseline-rerun"}
    assert sorted({s.lr_mult for s in specs if s.variant == "baseline"}) == [0.5, 1.0, 2.0]  # the rate check


def test_the_repetition_factor_truncates_the_text_at_a_fixed_step_count():
    rep = {c.name: c for c in cells("repetition")}
    for passes in (1, 2, 4, 8):
        cell = rep[f"encyclopedia-{passes}x"]
        assert cell.steps == BASE_STEPS
        assert cell.max_train_tokens * passes == BASE_STEPS * TOKENS_PER_STEP
        assert f"data.max_train_tokens={cell.max_train_tokens}" in cell.compare_config(3).overrides
    converse = rep["encyclopedia-1600-steps"]
    assert converse.max_train_tokens == 0 and converse.compare_config(3).steps == 1600
    demo = preset("demo")
    assert TOKENS_PER_STEP == demo.data.batch_size * demo.data.seq_len and BASE_STEPS == demo.loop.steps


def test_the_size_factor_keeps_tokens_per_parameter():
    size = cells("size", (64, 96, 128))
    ratios = [c.steps * TOKENS_PER_STEP / demo_parameters(c.d) for c in size]
    assert max(ratios) / min(ratios) < 1.01 and [c.d for c in size] == [64, 96, 128]
    assert "model.hidden_size=96" in size[1].compare_config(3).overrides


def test_an_unknown_factor_is_one_line(capsys):
    with pytest.raises(UserError, match="unknown study factor"):
        cells("tokenizer")
    assert main(["study", "--factor", "texts", "--out", "x"]) == 2
    assert "--factor 'texts': choose from text, repetition, size or all" in capsys.readouterr().err


def test_passes_over_data():
    assert passes_over_data(400, 16, 64, 409_600) == 1.0
    assert passes_over_data(20, 4, 32, 1280) == 2.0


def test_truncation_shares_the_budget_among_domains():
    tokens = {"a": np.arange(3000), "b": np.arange(1000)}
    cut = truncate_tokens(tokens, 2000, seq_len=32)
    assert len(cut["a"]) == 1500 and len(cut["b"]) == 500
    assert (cut["a"] == np.arange(1500)).all()  # the first tokens, in order
    assert truncate_tokens(tokens, 10_000, 32) is tokens
    with pytest.raises(UserError, match="less than one window"):
        truncate_tokens(tokens, 40, seq_len=32)


def test_select_domains_names_the_known_ones():
    from sdmoe.data.corpus import Document

    docs = [Document("drama", "a", "x"), Document("wiki", "b", "y")]
    assert [d.domain for d in select_domains(docs, ["wiki"])] == ["wiki"]
    assert select_domains(docs, []) == docs
    with pytest.raises(UserError, match="'poetry', which the text does not have; its domains are drama, wiki"):
        select_domains(docs, ["poetry"])


def test_a_run_records_its_passes(tmp_path, tiny_config):
    from sdmoe.train.loop import train

    tiny_config.data.max_train_tokens = 1280
    tiny_config.data.domains = ["drama"]
    train(tiny_config, tmp_path / "run", progress=False)
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["domains"] == ["drama"] and start["train_tokens"] == 1280
    steps, batch, seq = tiny_config.loop.steps, tiny_config.data.batch_size, tiny_config.data.seq_len
    assert start["passes"] == pytest.approx(steps * batch * seq / 1280)


def _fake_run(root, variant, lr, seed, loss, passes=1.5):
    d = root / variant / f"lr{lr}" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"status": "done", "val_loss": {"mean": loss}}))
    (d / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0, "passes": passes}) + "\n")


def test_the_study_pairs_runs_by_seed(tmp_path):
    cell = cells("text")[0]
    root = tmp_path / "text" / cell.name / "runs" / "qwen2_moe"
    for seed, (b, s, c) in enumerate([(4.0, 3.9, 4.01), (4.1, 3.95, 4.1), (4.2, 4.1, 4.22)]):
        _fake_run(root, "baseline", 1, seed, b)
        _fake_run(root, "sd-moe", 1, seed, s)
        _fake_run(root, "control", 1, seed, c)
    _fake_run(root, "baseline-rerun", 1, 0, 4.0)
    _fake_run(root, "baseline", 0.5, 0, 4.3)
    _fake_run(root, "baseline", 2, 0, 4.05)
    r = cell_result(cell, tmp_path)
    gain = r["gains"]["sd-moe"]
    assert gain["values"] == pytest.approx([0.1, 0.15, 0.1]) and gain["lo"] < gain["mean"] < gain["hi"]
    assert r["gains"]["control"]["mean"] == pytest.approx(-0.01)
    assert r["passes"] == 1.5 and r["same_seed_noise"] == 0.0 and r["baseline_best_rate"] == "1x"
    payload = write_study(tmp_path, ["text"])
    assert [c["cell"] for c in payload["cells"]] == ["drama"]  # cells not started are left out
    md = (tmp_path / "study.md").read_text()
    assert "| drama | drama | 1.50 | 400 | 4.100 | +0.117 [" in md and (tmp_path / "study.png").is_file()


def test_a_tiny_study_runs_resumes_and_rebuilds_its_report(tmp_path, capsys):
    """`sdmoe study --preset study-tiny --factor size`: two widths, each cell a compare, study.md from the cells;
    the same command trains nothing again; another factor grows the same --out; `sdmoe report` rebuilds it."""
    out = tmp_path / "study"
    argv = ["study", "--preset", "study-tiny", "--factor", "size", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| d=32 | mix |" in printed and "| d=48 | mix |" in printed and "study: 2 cells" in printed
    payload = json.loads((out / "study.json").read_text())
    assert [c["cell"] for c in payload["cells"]] == ["d32", "d48"]
    assert all(c["gains"]["sd-moe"]["n"] == 2 for c in payload["cells"])
    assert json.loads((out / "study_config.json").read_text())["config"]["factors"] == ["size"]
    mtimes = {p: p.stat().st_mtime for p in out.glob("size/*/runs/**/run.json")}
    assert len(mtimes) == 2 * 2 * 2  # 2 widths x baseline, sd-moe x 2 seeds
    assert main(argv) == 0
    assert {p: p.stat().st_mtime for p in out.glob("size/*/runs/**/run.json")} == mtimes
    assert main([*argv, "--seeds", "3"]) == 2  # other settings, same --out
    assert "holds a study with other settings" in capsys.readouterr().err
    (out / "study.md").unlink()
    assert main(["report", str(out)]) == 0 and "| d=48 | mix |" in (out / "study.md").read_text()


def test_a_study_written_before_its_settings_file_is_adopted(tmp_path):
    from sdmoe.experiments.engine import claim_out_dir
    from sdmoe.experiments.study import Study, StudyConfig

    (tmp_path / "text").mkdir()
    (tmp_path / "study.md").write_text("# old")
    study = Study(StudyConfig())
    claim_out_dir(tmp_path, study.config, study.settings_file, study.what, study.adopts)
    assert (tmp_path / "study_config.json").is_file()
    (tmp_path / "mine.txt").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty and holds no study"):
        claim_out_dir(other, study.config, study.settings_file, study.what, study.adopts)


def test_the_study_table_says_why_a_gain_has_no_interval():
    def row(**gains):
        return {"factor": "text", "label": "drama", "text": "drama", "passes": None, "steps": 400, "baseline_loss": 4.0,
                "gains": gains, "baseline_best_rate": None, "same_seed_noise": None}

    flat = {"mean": 0.5, "lo": None, "hi": None, "n": 2, "std": 0.0}
    one = {"mean": 0.1, "lo": None, "hi": None, "n": 1, "std": None}
    md = study_markdown([row(**{"sd-moe": flat, "control": one})])
    assert "| +0.500 in all 2 seeds (no spread, no interval) | +0.100 (1 seed) |" in md and "nan" not in md
    assert "| drama | drama | - | 400 | 4.000 | - |" in study_markdown([row(**{"sd-moe": {"n": 0}})])


@pytest.mark.parametrize("argv, fragment", [
    (["--sizes", "60"], "each hidden size must be a multiple of 8"),
    (["--sizes", "64,x"], "--sizes takes comma-separated hidden sizes"),
    (["--seeds", "1"], "a paired interval needs at least 2 seeds"),
    (["--factor", ","], "choose from text, repetition, size or all"),
])
def test_bad_study_arguments_are_one_line_and_write_nothing(tmp_path, capsys, argv, fragment):
    assert main(["study", *argv, "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and not (tmp_path / "study").exists()
