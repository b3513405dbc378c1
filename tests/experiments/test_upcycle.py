"""`compare --preset upcycle-tiny`: the parent, the upcycled starts, every arm and the report, end to end."""

import json

from sdmoe.cli import main
from sdmoe.experiments.upcycle import ARMS


def test_the_upcycle_compare_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "upc"
    assert main(["compare", "--preset", "upcycle-tiny", "--out", str(out), "--quiet"]) == 0
    payload = json.loads((out / "upcycle.json").read_text())
    rows = {r["arm"]: r for r in payload["rows"]}
    assert set(rows) == set(ARMS)
    assert rows["copy"]["overlap"]["start"] > 0.999  # copies start identical: the paper's failure at its purest
    assert rows["drop"]["overlap"]["start"] < 0.9  # Drop-Upcycling's re-drawn neurons tell them apart at once
    assert rows["dense"]["overlap"]["start"] is None
    for arm in ("copy+sd-moe", "drop", "drop+sd-moe", "dense"):
        assert rows[arm]["gain"]["n"] == 2 and rows[arm]["verdict"] in ("reproduced", "not reproduced",
                                                                        "inconclusive", "not measurable")
    assert payload["same_seed_noise"] == 0.0  # the copy baseline trained twice from the same start: bit-identical
    assert "| copy+sd-moe |" in (out / "upcycle.md").read_text()
    # a second call trains nothing and writes the same report
    before = (out / "upcycle.md").read_text()
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/*/run.json")}
    assert main(["compare", "--preset", "upcycle-tiny", "--out", str(out), "--quiet"]) == 0
    assert (out / "upcycle.md").read_text() == before
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/*/run.json")} == mtimes


def test_its_arms_are_fixed(tmp_path, capsys):
    assert main(["compare", "--preset", "upcycle-tiny", "--variants", "baseline,control", "--out",
                 str(tmp_path / "x")]) == 2
    assert "its arms are fixed" in capsys.readouterr().err
