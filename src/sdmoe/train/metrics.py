"""Metrics sinks: JSON lines always, TensorBoard when it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a line cut off by a crash is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the log matches the run."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", -1) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
