"""run.json, the record `train` keeps in its run directory: the run's config, its status ("running" |
"done") and, once done, its final validation losses. Written and read only here; torch-free, so the
compare's summary reads runs without loading a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdmoe.errors import UserError
from sdmoe.files import read_json_or_none, read_json_strict, shown, write_json_atomic

RUN_FILE = "run.json"


def run_record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_FILE


def read_run_record(run_dir: str | Path, strict: bool = False, fix: str = "") -> dict[str, Any] | None:
    """The record in `run_dir`/run.json.

    Lenient (`strict=False`, for reports of runs that may not have started): the record, or {} when
    the file is missing, damaged or holds no record. Strict (for resuming and reading a run's
    settings): None when it is missing; a one-line UserError ending in `fix` when it is damaged
    or holds no run config.
    """
    path = run_record_path(run_dir)
    if not strict:
        record = read_json_or_none(path)
        return record if isinstance(record, dict) else {}
    record = read_json_strict(path, fix=fix)
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("config"), dict)):
        raise UserError(f"{shown(path)} holds no run config; {fix}")
    return record


def write_run_record(run_dir: str | Path, config: dict[str, Any], status: str, **results: Any) -> Path:
    """Write run.json atomically: {"config", "status", **results} (a done run adds val_loss, skipped_steps)."""
    return write_json_atomic(run_record_path(run_dir), {"config": config, "status": status, **results})
