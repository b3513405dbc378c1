"""The tensors of a checkpoint directory's safetensors files, exactly as the files hold them.

Which file holds each tensor (the single `model.safetensors`, the shards a `model.safetensors.index.json`
names, or every `*.safetensors` of an unusual directory), opened memory-mapped, with one-line errors for
a missing shard or a damaged file. What the tensors mean is read above this: dequantised
(`sdmoe.moe.quantized`), checked and under the model's names (`sdmoe.moe.checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path

from sdmoe.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class StoredTensors:
    """A checkpoint directory's safetensors files: `key_file` (each stored tensor's name -> its file) and
    `stored(key)`, the safetensors slice of one tensor as its file holds it (read lazily, memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[Path, object] = {}
        self.key_file = self._index_keys()

    def _index_keys(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise UserError(
                    f"{index} is not a valid safetensors index (no weight_map); re-download the checkpoint"
                ) from None
            files = {name: self.path / name for name in set(weight_map.values())}
            missing = sorted(n for n, p in files.items() if not p.is_file())
            if missing:
                raise UserError(
                    f"{index.name} names {len(missing)} shard(s) missing from {self.path} (e.g. {missing[0]}); "
                    "download every shard of the checkpoint"
                )
            return {k: files[v] for k, v in weight_map.items()}
        if single.is_file():
            return {k: single for k in self._open(single).keys()}
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if others:  # unusual names, no index: read them all
            keys = {}
            for name in others:
                for k in self._open(self.path / name).keys():
                    keys[k] = self.path / name
            return keys
        bins = sorted(p.name for p in self.path.glob("*.bin"))
        hint = (
            f"it holds {bins[0]} (pickle); re-save it with save_pretrained(..., safe_serialization=True)"
            if bins
            else "download the model's *.safetensors files into it"
        )
        raise UserError(f"{self.path} holds no {SINGLE_FILE} or {INDEX_FILE}; {hint}")

    def _open(self, file: Path):
        from safetensors import SafetensorError, safe_open

        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise UserError(
                    f"file {file} is truncated or corrupt; re-download it (safetensors: {str(e).splitlines()[0]})"
                ) from None
            self._handles[file] = handle
        return handle

    def stored(self, key: str):
        """The safetensors slice of a tensor exactly as its file holds it (a quantised one's data or scales too)."""
        return self._open(self.key_file[key]).get_slice(key)

    def close(self) -> None:
        self._handles.clear()
