"""Files and run directories as bad input, through `sdmoe.cli.main`: exit 2, ONE
`sdmoe: error:` line naming the problem, nothing pre-existing changed, nothing left behind.

- text inputs are read as regular files with a bound: a FIFO (must not hang), a device,
  a socket, a symlink loop, a directory holding a FIFO, a file name that is not UTF-8,
  more text than SDMOE_MAX_TEXT_BYTES;
- an --out that cannot hold what the run writes (not UTF-8, a component over 255 bytes,
  too long once the run's own names are appended) fails before the first step;
- corrupt state files (run.json, a checkpoint's state.json, compare.json) are named as
  corrupt; a metrics.jsonl with bytes that are not UTF-8 does not stop a resume.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from sdmoe.cli import main
from tests.reliability.test_bad_input import error_line, snapshot

TRAIN = ["train", "--preset", "tiny", "--quiet", "--set", "loop.monitor_every=0", "--set", "loop.threads=1"]
PATH_MAX = os.pathconf("/", "PC_PATH_MAX")  # 4096 on Linux, the terminating NUL included


def tree(root: Path) -> set[str]:
    """Every path below `root`, directories included (what 'nothing left behind' compares)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def alarm():
    """Fail a test that blocks (e.g. opening a FIFO no one writes) instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError("blocked for 30 s: reading the input hung")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    os.mkfifo(root / "fifo")
    (root / "with_fifo").mkdir()
    (root / "with_fifo" / "a.txt").write_text("some text\n" * 50)
    os.mkfifo(root / "with_fifo" / "pipe")
    (root / "loop").symlink_to("loop")
    (root / "broken").symlink_to("nowhere")
    (root / "bad_name").mkdir()
    (root / "bad_name" / "good.txt").write_text("some text\n" * 50)
    (Path(os.fsdecode(bytes(root / "bad_name") + b"/\xff.txt"))).write_text("more text\n" * 50)
    (root / "big").mkdir()
    for name in ("a.txt", "b.txt"):
        (root / "big" / name).write_text("0123456789" * 60)  # 600 bytes each
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))  # kept bound (open) while the module runs
    yield root
    sock.close()


# (id, --text argument (inputs root -> path), fragment, environment)
TEXT_CASES = [
    ("fifo", lambda r: r / "fifo", "fifo is a FIFO (named pipe), not a regular file", {}),
    ("dev_zero", lambda r: "/dev/zero", "/dev/zero is a character device, not a regular file", {}),
    ("dev_urandom", lambda r: "/dev/urandom", "/dev/urandom is a character device, not a regular file", {}),
    ("socket", lambda r: r / "sock", "sock is a socket, not a regular file", {}),
    ("symlink_loop", lambda r: r / "loop", "loop is a symlink loop", {}),
    ("broken_symlink", lambda r: r / "broken", "broken is a broken symlink", {}),
    ("dir_with_fifo", lambda r: r / "with_fifo", "pipe is a FIFO (named pipe), not a regular file; remove it from", {}),
    ("undecodable_name", lambda r: r / "bad_name", "bad_name/\\xff.txt is not valid UTF-8; rename it", {}),
    ("over_the_limit", lambda r: r / "big", "past 1,000 bytes in all; pass less text, or raise the limit with "
     "the environment variable SDMOE_MAX_TEXT_BYTES", {"SDMOE_MAX_TEXT_BYTES": "1000"}),
    ("limit_not_a_number", lambda r: r / "big", "SDMOE_MAX_TEXT_BYTES='lots' is not a positive number of bytes",
     {"SDMOE_MAX_TEXT_BYTES": "lots"}),
]


@pytest.mark.parametrize("case, text, fragment, env", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_that_is_not_a_regular_utf8_file_is_one_line(case, text, fragment, env, inputs, tmp_path, capsys,
                                                          monkeypatch, alarm):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    before = snapshot(inputs)
    assert main([*TRAIN, "--text", str(text(inputs)), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert fragment in line, line
    assert snapshot(inputs) == before
    assert not (out / "run.json").exists() and not (out / "checkpoints").exists()


def test_the_limit_counts_all_files_together(inputs, monkeypatch):
    from sdmoe.data.corpus import load_texts

    monkeypatch.setenv("SDMOE_MAX_TEXT_BYTES", "1200")  # both 600-byte files fit exactly
    assert len(load_texts([inputs / "big"])) == 2
    monkeypatch.setenv("SDMOE_MAX_TEXT_BYTES", "1199")
    with pytest.raises(Exception, match="past 1,199 bytes in all"):
        load_texts([inputs / "big"])


# -- an --out that cannot hold the run -----------------------------------------------


def _too_long_once_the_run_writes(base: Path, length: int) -> Path:
    """A path of exactly `length` characters below `base`, made of components under 255 bytes."""
    out, parts = str(base), []
    while len(out) + 1 + 200 < length:
        parts.append("d" * 200)
        out += "/" + parts[-1]
    return Path(out + "/" + "e" * (length - len(out) - 1))


OUT_CASES = [
    ("not_utf8", lambda t: Path(os.fsdecode(bytes(t) + b"/run-\xff")), "is not a valid UTF-8 path"),
    ("component_over_255_bytes", lambda t: t / ("r" * 256), "(File name too long); choose a shorter --out"),
    # the directory itself fits in PATH_MAX, checkpoints/.tmp-step_0000020-xxxxxxxx/... does not
    ("too_long_for_the_checkpoints", lambda t: _too_long_once_the_run_writes(t, PATH_MAX - 40),
     "(File name too long); choose a shorter --out"),
]


@pytest.mark.parametrize("case, make_out, fragment", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_an_out_that_cannot_hold_the_run_fails_before_the_first_step(case, make_out, fragment, tmp_path, capsys,
                                                                     monkeypatch):
    import sdmoe.train.loop as loop

    monkeypatch.setattr(loop, "prepare_dataset", lambda *a, **k: pytest.fail("the data was prepared"))
    out = make_out(tmp_path)
    assert len(str(out)) < PATH_MAX
    assert main([*TRAIN, "--steps", "20", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert fragment in line, line
    assert tree(tmp_path) == set()  # no directory made on the way was left behind


def test_a_compare_out_too_long_for_its_runs_fails_before_the_first_run(tmp_path, capsys):
    out = _too_long_once_the_run_writes(tmp_path, PATH_MAX - 60)  # runs/<style>/<variant>/lr1/seed0/... does not fit
    assert main(["compare", "--preset", "tiny", "--quiet", "--out", str(out)]) == 2
    assert "(File name too long); choose a shorter --out" in error_line(capsys)
    assert tree(tmp_path) == set()


def test_the_probe_leaves_an_existing_out_as_it_was(tmp_path):
    from sdmoe.files import probe_writable
    from sdmoe.train.checkpoint import run_dir_probes

    (tmp_path / "keep.txt").write_text("x")
    probe_writable(tmp_path, run_dir_probes(20))
    assert tree(tmp_path) == {"keep.txt"}


# -- corrupt state files --------------------------------------------------------------


RESUME = [*TRAIN, "--steps", "4", "--set", "loop.checkpoint_every=2", "--resume"]


@pytest.fixture()
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_a_truncated_run_json_on_resume_is_named_corrupt(run_copy, capsys):
    data = (run_copy / "run.json").read_bytes()
    (run_copy / "run.json").write_bytes(data[: len(data) // 2])
    before = snapshot(run_copy)
    assert main([*RESUME, "--out", str(run_copy)]) == 2
    line = error_line(capsys)
    assert "run.json is truncated or corrupt" in line and "restore it" in line, line
    assert snapshot(run_copy) == before


def test_a_truncated_state_json_names_the_checkpoint_to_delete(run_copy, capsys):
    state = run_copy / "checkpoints" / "step_0000004" / "state.json"
    state.write_bytes(state.read_bytes()[:100])
    assert main([*RESUME, "--out", str(run_copy)]) == 2
    line = error_line(capsys)
    assert "checkpoint step_0000004 is unusable: delete it to resume from an earlier one" in line, line
    shutil.rmtree(state.parent)  # as the message says
    assert main([*RESUME, "--out", str(run_copy)]) == 0  # resumed from step 2


def test_metrics_with_bytes_that_are_not_utf8_do_not_stop_a_resume(run_copy, capsys):
    from sdmoe.train.metrics import read_metrics

    metrics = run_copy / "metrics.jsonl"
    good = read_metrics(metrics)
    with open(metrics, "ab") as f:
        f.write(b'{"step": 3, "loss": \xff\xfe}\n')  # a foreign or damaged line
    assert read_metrics(metrics) == good  # skipped like a cut-off line
    assert main([*RESUME, "--out", str(run_copy)]) == 0, capsys.readouterr().err
    assert b"\xff" not in metrics.read_bytes()  # the resume's rewrite dropped it


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_corrupt_compare_json_is_named_corrupt_not_missing(command, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text('{"version": 1, "config": {"sty')
    before = snapshot(tmp_path)
    argv = ["report", str(out)] if command == "report" else \
        ["compare", "--preset", "tiny", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "compare.json is truncated or corrupt" in line and "holds no" not in line, line
    assert snapshot(tmp_path) == before and tree(out) == {"compare.json"}


def test_a_compare_run_with_a_corrupt_run_json_is_not_deleted(tmp_path):
    from sdmoe.errors import UserError
    from sdmoe.experiments.compare import run_state

    run = tmp_path / "runs" / "qwen2_moe" / "baseline" / "lr1" / "seed0"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "run.json").write_text('{"config": {"mo')
    with pytest.raises(UserError, match=r"run.json is truncated or corrupt .*delete .*seed0 to train that run again"):
        run_state(run)  # was read as "new", and a new run's directory is cleared
