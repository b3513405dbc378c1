"""sdmoe.files: the one atomic writer (files and directories), forgiving and bounded reads,
and what counts as a failed write."""

from __future__ import annotations

import errno
import json
import os

import pytest

from sdmoe.errors import UserError
from sdmoe.files import (
    atomic_dir,
    printable,
    read_bounded,
    read_json_or_none,
    read_json_strict,
    read_jsonl_lenient,
    tmp_dir_name,
    write_bytes_atomic,
    write_failure,
)


def test_atomic_dir_renames_into_place_and_replaces_the_old(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-")
        assert len(tmp.name) <= len(tmp_dir_name("model"))  # what the start-up probe measures
        (tmp / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)  # mkdtemp's 0700 opened up: results are shared


def test_atomic_dir_removes_its_temp_dir_and_keeps_the_old_target_when_the_block_fails(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "old.bin").read_bytes() == b"old"


def test_atomic_dir_without_replace_keeps_what_another_process_made_first(tmp_path):
    target = tmp_path / "entry"
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "a").write_text("mine")
        target.mkdir()  # another process finishes the same entry meanwhile
        (target / "a").write_text("theirs")
    assert (target / "a").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_write_bytes_atomic_leaves_no_temp_file_when_the_write_fails(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("old")

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "a.json", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and (tmp_path / "a.json").read_text() == "old"


def test_write_failure_knows_the_libraries_ways_of_saying_the_disk_is_full():
    from safetensors import SafetensorError

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        torch_style = e
    assert write_failure(torch_style) == "No space left on device"
    rust_style = SafetensorError("I/O error: No space left on device (os error 28)")
    assert write_failure(rust_style) == "No space left on device"
    assert write_failure(Exception("Read-only file system (os error 30)")) == os.strerror(30)
    assert write_failure(OSError(errno.EACCES, "Permission denied")) == "Permission denied"
    assert write_failure(RuntimeError("shape mismatch")) is None  # a bug stays a bug
    assert write_failure(KeyError("step")) is None


def test_read_jsonl_skips_cut_off_and_undecodable_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n{"c": 3}\n{"d": ')
    assert read_jsonl_lenient(path) == [{"a": 1}, {"c": 3}]
    assert read_jsonl_lenient(tmp_path / "nope.jsonl") == []


def test_read_json_strict_tells_missing_from_corrupt(tmp_path):
    assert read_json_strict(tmp_path / "nope.json", fix="x") is None
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert read_json_strict(tmp_path / "ok.json", fix="x") == {"a": 1}
    for name, data, why in [("cut.json", b'{"a": ', "invalid JSON"), ("empty.json", b"", "empty"),
                            ("latin.json", b'{"a": "\xe9"}', "not UTF-8")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"{name} is truncated or corrupt \({why}.*\); restore it"):
            read_json_strict(tmp_path / name, fix="restore it")
        assert read_json_or_none(tmp_path / name) is None  # the lenient reader: as if it were missing
    assert read_json_or_none(tmp_path / "nope.json") is None and read_json_or_none(tmp_path / "ok.json") == {"a": 1}


def test_read_bounded_stops_one_byte_past_the_limit(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" * 10)
    assert read_bounded(path, 10, fix="f", too_big="is too big") == b"x" * 10
    with pytest.raises(UserError, match="t.txt is too big"):
        read_bounded(path, 9, fix="f", too_big="is too big")


def test_read_bounded_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "p")
    with pytest.raises(UserError, match="is a FIFO"):
        read_bounded(tmp_path / "p", 10, fix="f", too_big="x")


def test_printable_shows_undecodable_bytes_as_escapes():
    assert printable(os.fsdecode(b"runs/\xff.txt")) == "runs/\\xff.txt"
    assert printable("caf\u00e9") == "caf\u00e9"
