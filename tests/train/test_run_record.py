"""run.json, one reader and one writer: lenient for reports, strict (one-line errors) for resumes."""

import json
import subprocess
import sys

import pytest

from sdmoe.errors import UserError
from sdmoe.train.run_record import RUN_FILE, read_run_record, write_run_record

FIX = "restore it, or start a new run in another --out"


def test_a_written_record_reads_back(tmp_path):
    path = write_run_record(tmp_path, {"method": "baseline"}, "done", val_loss={"mean": 4.2}, skipped_steps=0)
    assert path == tmp_path / RUN_FILE
    assert json.loads(path.read_text()) == {"config": {"method": "baseline"}, "status": "done",
                                            "val_loss": {"mean": 4.2}, "skipped_steps": 0}
    assert read_run_record(tmp_path) == read_run_record(tmp_path, strict=True, fix=FIX)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left beside it


@pytest.mark.parametrize("text, why", [('{"config": {"me', "truncated or corrupt"), ("[1, 2]", "holds no run config"),
                                       ('{"status": "done"}', "holds no run config")])
def test_a_damaged_record_is_empty_to_a_report_and_an_error_to_a_resume(tmp_path, text, why):
    (tmp_path / RUN_FILE).write_text(text)
    assert read_run_record(tmp_path) == ({"status": "done"} if text.startswith('{"status') else {})
    with pytest.raises(UserError, match=rf"run.json (is )?{why}.*; {FIX}$"):
        read_run_record(tmp_path, strict=True, fix=FIX)


def test_a_missing_record(tmp_path):
    assert read_run_record(tmp_path) == {} and read_run_record(tmp_path, strict=True, fix=FIX) is None


def test_reading_a_record_needs_no_torch():
    code = ("import sys, sdmoe.train.run_record, sdmoe.experiments.claims; "
            "assert 'torch' not in sys.modules, 'torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
