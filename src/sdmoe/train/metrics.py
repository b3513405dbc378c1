"""Metrics sinks: JSON lines always, TensorBoard when it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdmoe.errors import UserError
from sdmoe.files import read_jsonl_lenient, write_text_atomic


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
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise UserError(f"could not write metrics to {self.path} ({e.strerror or e}); "
                            "free space or fix permissions, then --resume") from None
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
    return read_jsonl_lenient(path)


# Events logged with the 0-based index of the step they happen in (before or inside it);
# every other record carries the number of steps done. A checkpoint after `step`
# steps holds the former only for indices < step.
_STEP_INDEX_EVENTS = ("split", "reestimate", "skipped")


def _before(record: dict[str, Any], step: int) -> bool:
    s = record.get("step", -1)
    return s < step if record.get("event") in _STEP_INDEX_EVENTS else s <= step


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the log matches the run (atomic rewrite)."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if _before(r, step)]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
