"""Files on disk, the one way the project writes them: atomic writes, forgiving reads, JSON-safe values.

Every record, report, figure, checkpoint and cache entry goes through here, so a
crash never leaves half a file or half a directory and a reader never trips on a
line a killed process cut off. Also here: bounded reads of user files, the probe
that an output path can hold everything a run will write, and the lock that keeps
two processes out of one output directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdmoe.errors import UserError

# What a temporary file or directory beside its target is called. `clean_partial`
# (sdmoe.train.checkpoint) removes exactly these after a crash: keep them in step.
TMP_DIR_PREFIX = ".tmp-"
_RANDOM = "x" * 8  # tempfile's random part: 8 characters


def tmp_file_name(name: str) -> str:
    """The longest name `write_bytes_atomic` gives the temp file of `name` (for probes)."""
    return f".{name}.{_RANDOM}.tmp"


def tmp_dir_name(name: str) -> str:
    """The longest name `atomic_dir` gives the temp directory of `name` (for probes)."""
    return f"{TMP_DIR_PREFIX}{name}-{_RANDOM}"


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


def shown(path: str | Path) -> str:
    """`path` as printable text: a name holding bytes that are not UTF-8 shows them as \\xNN
    (printing the raw surrogates would raise UnicodeEncodeError)."""
    return printable(str(path))


def printable(text: str) -> str:
    """`text` with lone surrogates (undecodable bytes of a file name) as \\xNN escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def is_utf8_name(path: str | Path) -> bool:
    """Whether `path` encodes as UTF-8. The Rust writers (safetensors, tokenizers) take paths as
    UTF-8 strings and fail on a name holding undecodable bytes, which the OS itself accepts."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- writing ------------------------------------------------------------------------


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    """Write to a temp file beside `path`, fsync, rename: the old file or the new one, never half.

    `fsync=False` for large, re-creatable files (token caches): the rename still keeps
    them whole against a dying process, just not against a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and caches are meant to be shared
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: no stray temp file beside the old one
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str, fsync: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: str | Path, payload: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_dirs(path: str | Path) -> list[Path]:
    """`mkdir -p path`, returning the directories this call created, outermost first, so that a job
    that fails can take them back (`remove_made`) and leave the disk as it found it."""
    made: list[Path] = []
    try:
        for d in [*reversed(Path(path).parents), Path(path)]:
            if not d.exists():
                try:
                    d.mkdir()
                except FileExistsError:  # another process made it meanwhile: theirs, not ours to remove
                    continue
                made.append(d)
    except BaseException:  # half a chain made: take it back before the caller hears of the failure
        remove_made(made)
        raise
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the directories `make_dirs` created, innermost first, each only if it is empty (what another
    process put there meanwhile stays)."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            pass


def refuse_enclosing_cwd(target: str | Path, flag: str = "--out") -> None:
    """A directory the job replaces must not be the working directory or hold it: replacing `.` removes
    everything in it, and the shell that ran the job is left in a deleted directory."""
    here, where = Path.cwd().resolve(), Path(target).expanduser().resolve()
    if where == here or where in here.parents:
        name = "the working directory" if where == here else f"a directory that holds the working directory ({here})"
        raise UserError(f"{flag} {shown(target)} is {name}, which the output would replace; choose a new "
                        "directory for it")


def remove_stale_tmp_dirs(target: str | Path) -> list[Path]:
    """Remove the temp directories `atomic_dir` left beside `target` in a process that was killed (SIGKILL,
    OOM): `.tmp-<name>-XXXXXXXX` that no live process holds. `atomic_dir` holds a lock on its temp dir
    while it fills it, so a second job writing the same target meanwhile keeps its own. Returns those removed."""
    target = Path(target)
    prefix = f"{TMP_DIR_PREFIX}{target.name}-"
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not (p.name.startswith(prefix) and len(p.name) == len(prefix) + len(_RANDOM)) or not p.is_dir() \
                or p.is_symlink():
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: nobody is writing it
        except OSError:  # held by a live job (or a file system without locks: leave it)
            os.close(fd)
            continue
        shutil.rmtree(p, ignore_errors=True)
        os.close(fd)
        removed.append(p)
    return removed


@contextmanager
def atomic_dir(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temp directory `.tmp-<name>-XXXXXXXX` beside `target` to fill; renamed to `target` in one
    `os.replace` when the block ends, removed (with whatever is in it, and the parent directories this
    created) when the block raises, SIGTERM included once the CLI has turned it into an exception.

    A reader sees the old `target` or the whole new one, never half of it. `replace=True`
    removes an existing `target` first; `replace=False` keeps it (another process made the
    same thing first, e.g. a shared cache entry) and discards the new one. Temp directories a
    killed process left beside `target` are removed first; the live one is locked so that
    another job's clean-up leaves it alone.
    """
    target = Path(target).absolute()  # "." has no parent of its own to put the temp dir beside
    if replace:
        refuse_enclosing_cwd(target, "the output")
    made = make_dirs(target.parent)
    try:
        remove_stale_tmp_dirs(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_DIR_PREFIX}{target.name}-"))
    except BaseException:
        remove_made(made)
        raise
    lock = DirLock(tmp).acquire()
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; results and caches are meant to be shared
        if replace and (target.exists() or target.is_symlink()):
            _remove(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # theirs stands
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise
    finally:
        lock.release()


def write_failure(e: BaseException) -> str | None:
    """Why a write failed ("No space left on device", ...) when `e` is an I/O error, else None.

    torch and safetensors do not raise OSError: torch.save into a Python file raises
    RuntimeError("... unexpected pos ...") with the OSError as its context, safetensors
    and tokenizers (Rust) raise their own types with "(os error 28)" in the message.
    Anything else (a real bug) gets None, so it is not passed off as a full disk.
    """
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError):
            return x.strerror or str(x)
        if m := re.search(r"\(os error (\d+)\)", str(x)):
            return os.strerror(int(m.group(1)))
        if reason := next((r for r in _WRITE_ERRORS if r in str(x)), None):
            return reason
        x = x.__cause__ or x.__context__
    return None


# The errors a write can meet that are about the disk, not the program (by their strerror text,
# for library messages that quote it without an errno).
_WRITE_ERRORS = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG))


def probe_writable(root: str | Path, relpaths: Iterable[str], flag: str = "--out") -> None:
    """Create and delete `root/relpath` for each relpath (the longest names a job will write,
    in every directory it will write), and remove the directories this made on the way.

    A path that cannot hold the job's files (a name that is not UTF-8, a component over the
    file system's 255 bytes, a path too long once the job's names are appended, a read-only
    or full file system) fails here, before any work, instead of at the final save. Leaves
    nothing behind; raises a one-line UserError naming `flag`.
    """
    root = Path(root)
    if not is_utf8_name(root.absolute()):
        raise UserError(f"{flag} {shown(root)} is not a valid UTF-8 path (the model writers need one); "
                        f"choose a {flag} whose name is UTF-8")
    for rel in relpaths:
        target, made = root / rel, []
        try:
            made = make_dirs(target.parent)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            target.unlink()
        except OSError as e:
            where = e.filename if isinstance(e.filename, str) else target
            fix = f"choose a shorter {flag}" if e.errno == errno.ENAMETOOLONG else f"choose a writable {flag}"
            raise UserError(f"cannot write to {shown(where)} ({e.strerror}); {fix}") from None
        finally:
            remove_made(made)


def size_text(n: float) -> str:
    """Bytes as a person reads them: 512 B, 3.4 MiB, 1.2 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def existing_ancestor(path: str | Path) -> Path:
    """`path` itself, or its nearest ancestor that exists (where a new directory would be made)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_new_output_dir(out: str | Path, need_bytes: int, longest_file: str, flag: str = "--out") -> None:
    """`out` as the target of a job that writes a whole directory (`atomic_dir`): absent or an empty
    directory, not the working directory, writable (the temp dir beside it and its longest file can be
    made), on a file system with room for `need_bytes`. One line naming the fix; nothing left behind."""
    out = Path(out).expanduser()
    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {shown(out)} is a broken symlink; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a directory that is not empty"
        raise UserError(f"{flag} {shown(out)} is {what}; choose a new {flag} (nothing was written)")
    refuse_enclosing_cwd(out, flag)
    absolute = out.absolute()
    probe_writable(absolute.parent, [f"{tmp_dir_name(absolute.name)}/{longest_file}"], flag)
    where = existing_ancestor(absolute.parent)
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise UserError(f"the output needs about {size_text(need_bytes)} but {shown(where)} has {size_text(free)} "
                        f"free; free space, or choose a {flag} on a larger disk")


# -- reading ------------------------------------------------------------------------


# What each JSON reader does with a damaged file is in its name: `read_json_or_none` returns None,
# as for a missing one (a record its reader can do without); `read_json_strict` raises a one-line
# UserError (state a job resumes from: read as absent, it would be overwritten); `read_jsonl_lenient`
# skips the damaged lines (an append-only log a crash may have cut off).


def read_json_or_none(path: str | Path) -> Any | None:
    """The file's value, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_json_strict(path: str | Path, fix: str) -> Any | None:
    """The file's value; None when it does not exist; a one-line UserError ending in `fix` when
    it exists but cannot be read or parsed (truncated, corrupt, not UTF-8)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {shown(path)} ({e.strerror}); {fix}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        why = f"not UTF-8 at byte {e.start}"
    except json.JSONDecodeError as e:
        why = "empty" if not data.strip() else f"invalid JSON at character {e.pos}"
    raise UserError(f"{shown(path)} is truncated or corrupt ({why}); {fix}")


def read_jsonl_lenient(path: str | Path) -> list[Any]:
    """All records of a JSON-lines file; a line cut off by a crash, or holding bytes that are
    not UTF-8 (a disk error, a foreign write), is skipped like a cut-off line."""
    records = []
    path = Path(path)
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
    return records


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ... for a stat mode that is no regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def stat_regular(path: Path, fix: str) -> os.stat_result:
    """`path`'s stat (symlinks followed) when it is a regular file; else a one-line UserError:
    a FIFO, socket, device or directory is named as such, a symlink loop as a loop."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{shown(path)} is a symlink loop; {fix}") from None
        if e.errno == errno.ENOENT and path.is_symlink():
            raise UserError(f"{shown(path)} is a broken symlink; {fix}") from None
        raise UserError(f"cannot read {shown(path)} ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{shown(path)} is {file_kind(st.st_mode)}, not a regular file; {fix}")
    return st


def read_bounded(path: str | Path, limit: int, fix: str, too_big: str) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them.

    Never blocks and never reads without end: a FIFO, socket or device (/dev/zero,
    /dev/urandom) is refused before it is opened (and opened non-blocking, in case it was
    swapped in after the check); a file over `limit` bytes raises the UserError
    "<path> <too_big>". `fix` ends the other messages.
    """
    path = Path(path)
    stat_regular(path, fix)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"cannot read {shown(path)} ({e.strerror}); {fix}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{shown(path)} is {file_kind(mode)}, not a regular file; {fix}")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UserError(f"cannot read {shown(path)} ({e.strerror}); {fix}") from None
    if len(data) > limit:
        raise UserError(f"{shown(path)} {too_big}")
    return data


# -- one process per output directory ------------------------------------------------


def _lock_holder(path: Path) -> int | None:
    """The pid holding a flock on directory `path`, from /proc/locks (Linux); None if unknown."""
    try:
        st = os.stat(path)
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE":
                major, minor, ino = parts[5].split(":")
                if (int(major, 16), int(minor, 16), int(ino)) == want:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


class DirLock:
    """An exclusive lock on a directory, held while a job writes into it.

    `fcntl.flock` on the directory itself (no lock file: an extra file would make a fresh
    output directory look used, and removing one races with the next taker). Non-blocking:
    a second taker fails at once with a UserError naming the holder's pid. The kernel drops
    the lock when the holder's process dies, so a SIGKILLed run can be resumed at once.

    `acquire()` is a no-op while the directory does not exist yet (call it again once it
    does) or when held already; a file system without flock support goes unlocked.
    """

    def __init__(self, path: str | Path, busy: str = "is being trained by another process"):
        self.path, self.busy = Path(path), busy
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        try:
            if self._fd is not None or not stat.S_ISDIR(os.stat(self.path).st_mode):
                return self
        except OSError:  # missing, or a path the probe then names (too long, not a directory)
            return self
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _lock_holder(self.path)
            raise UserError(f"{shown(self.path)} {self.busy} ({f'pid {pid}' if pid else 'pid unknown'}); "
                            "wait for it to finish or choose another --out") from None
        except OSError:  # e.g. a network file system without flock: go on unlocked
            os.close(fd)
            return self
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
