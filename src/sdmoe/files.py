"""Files on disk, the one way the project writes them: atomic writes, forgiving reads, JSON-safe values.

Every record, report and figure a run, an analysis or a compare leaves behind
goes through here, so a crash never leaves half a file and a reader never
trips on a line a killed process cut off.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, tensors/arrays -> lists, keys -> str (strict JSON readers)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return json_safe(x.tolist())
    return x


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside `path`, fsync, rename: the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: no stray temp file beside the old one
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def read_json(path: str | Path) -> Any | None:
    """The file's value, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_jsonl(path: str | Path) -> list[Any]:
    """All records of a JSON-lines file; a line cut off by a crash is skipped."""
    records = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
