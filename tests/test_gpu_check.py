"""`benchmarks/gpu_check.py --tiny`: the GPU check runs end to end on the CPU, so a GPU run meets no surprise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the whole prepared check on the CPU, its own pytest run inside: about a minute
def test_the_gpu_check_runs_on_the_cpu_and_writes_both_files(tmp_path):
    # no time budget: on a loaded machine a slow section must not turn into a skip, nor the test into a timeout
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--budget-s", "inf", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = data["sections"]
    assert list(sections) == ["device", "tests", "kernels", "memory", "step time", "compile", "training"]
    # nothing skipped for time ("N s left ..."); the CPU has no device-memory counter to read
    assert data["budget_s"] is None and not [name for name, r in sections.items() if " left" in r.get("skipped", "")]
    assert "no device-memory counter" in sections["memory"]["skipped"]
    assert not [name for name, r in sections.items() if "error" in r]
    assert sections["tests"]["returncode"] == 0 and " passed" in sections["tests"]["summary"]
    assert sections["kernels"]["fastest"] in sections["kernels"]["ms"]
    step = sections["step time"]
    assert 0.5 < step["sd-moe/baseline"]["median"] < 5 and 0 < step["sd-moe/split_share"] < 1
    compiled = sections["compile"]  # the split ran inside the compiled run and matched eager
    assert compiled["split_in_compiled_run"] and compiled["max_rel_loss_gap"] < 1e-5, compiled
    runs = sections["training"]["runs"]
    assert all(0 < runs[side]["val_loss"] < 10 for side in ("baseline", "sd-moe", "paper"))
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (tiny sizes)") and "| sd-moe |" in md and "passed" in md
    assert (tmp_path / "gpu_tests.log").stat().st_size > 0 and (tmp_path / "loss_curves.png").stat().st_size > 0
