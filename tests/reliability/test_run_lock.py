"""One process per output directory: a second `train` (or `compare`) on an --out that
another process holds gets one line naming that process and touches nothing; the lock
dies with its holder, so a run killed with SIGKILL resumes at once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from sdmoe.cli import main
from tests.reliability.test_bad_input import error_line, snapshot

TRAIN = ["train", "--preset", "tiny", "--quiet", "--steps", "4", "--set", "loop.checkpoint_every=2",
         "--set", "loop.monitor_every=0", "--set", "loop.threads=1"]

# Another process holding the lock the way sdmoe does (flock on the directory), until killed.
HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    time.sleep(300)
""")


@pytest.fixture()
def hold():
    """hold(path) -> a second process holding `path`'s lock (SIGKILLed at the end)."""
    procs = []

    def start(path):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def test_a_second_train_on_a_held_out_is_one_line_and_touches_nothing(finished_run, tmp_path, hold, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    # what the first process is writing right now: its start-up clean-up must not be run by the second
    partial = run / "checkpoints" / ".tmp-step_0000006-abcdefgh"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    holder = hold(run)
    before = snapshot(run)
    assert main([*TRAIN, "--resume", "--out", str(run)]) == 2
    line = error_line(capsys)
    assert f"is being trained by another process (pid {holder.pid}); wait for it" in line, line
    assert snapshot(run) == before  # the first's temp files included

    holder.send_signal(signal.SIGKILL)  # the first dies: the kernel drops its lock
    holder.wait(timeout=30)
    assert main([*TRAIN, "--resume", "--out", str(run)]) == 0
    assert not partial.exists()  # now it is a dead process's leftover, and cleaned up


def test_a_fresh_out_held_by_another_train_is_refused_too(tmp_path, hold, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold(out)
    assert main([*TRAIN, "--out", str(out)]) == 2
    assert f"(pid {holder.pid})" in error_line(capsys)
    assert list(out.iterdir()) == []


def test_a_second_compare_on_a_held_out_is_refused(tmp_path, hold, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    holder = hold(out)
    assert main(["compare", "--preset", "tiny", "--quiet", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert f"is being written by another `sdmoe compare` (pid {holder.pid})" in line, line
    assert list(out.iterdir()) == []


def test_the_lock_is_released_when_train_fails(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an empty --out the run locks before it reads the text
    assert main([*TRAIN, "--text", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2  # fails after locking
    capsys.readouterr()
    from sdmoe.errors import UserError
    from sdmoe.files import DirLock

    with DirLock(out):  # free again in this very process: taking it raises nothing ...
        with pytest.raises(UserError, match="another process"):
            DirLock(out).acquire()  # ... and it is really held now (a second taker is refused)
    assert list(out.iterdir()) == []  # the run wrote nothing into it


def test_dirlock_is_exclusive_and_reentrant_for_its_holder(tmp_path):
    from sdmoe.errors import UserError
    from sdmoe.files import DirLock

    first = DirLock(tmp_path).acquire()
    assert first.acquire() is first  # a second acquire by the holder is a no-op
    with pytest.raises(UserError, match=r"is being trained by another process \(pid \d+\)"):
        DirLock(tmp_path).acquire()
    first.release()
    DirLock(tmp_path).acquire().release()
    assert DirLock(tmp_path / "not-yet").acquire()._fd is None  # nothing to lock until it exists
