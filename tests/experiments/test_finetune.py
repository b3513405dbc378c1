"""`sdmoe finetune-compare --preset finetune-tiny`: base on two domains, adapted to the third, with and without
SD-MoE; the old spelling `compare --preset finetune-tiny`."""

import json

from sdmoe.cli import main


def test_the_finetune_compare_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune-compare", "--preset", "finetune-tiny", "--out", str(out), "--quiet"]) == 0
    payload = json.loads((out / "finetune.json").read_text())
    assert set(payload["before"]) == {"drama", "encyclopedia", "fairy_tales", "mean"}
    rows = {r["what"]: r for r in payload["rows"]}
    assert set(rows) == {"new domain", "old domains"}
    assert all(r["gain"]["n"] == 2 for r in rows.values())
    assert all(r["same_seed_noise"] == 0.0 for r in rows.values())  # the rerun of baseline seed 0 is bit-identical
    # the base trained on the old domains only; the adapted models on the new one only
    base = json.loads((out / "base" / "run.json").read_text())["config"]["data"]["domains"]
    adapted = json.loads((out / "runs" / "sd-moe" / "seed1" / "run.json").read_text())["config"]
    assert base == ["drama", "encyclopedia"] and adapted["data"]["domains"] == ["fairy_tales"]
    assert adapted["init"].endswith("base/model")
    assert "| new domain |" in (out / "finetune.md").read_text()
    # the same command resumes: nothing trains again
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/*/run.json")}
    assert len(mtimes) == 2 * 2 + 1  # baseline and SD-MoE x 2 seeds, and the baseline's rerun
    assert main(["finetune-compare", "--preset", "finetune-tiny", "--out", str(out), "--quiet"]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/*/run.json")} == mtimes


def test_text_is_refused(tmp_path, capsys):
    assert main(["compare", "--preset", "finetune-tiny", "--text", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--text with --preset finetune" in capsys.readouterr().err
