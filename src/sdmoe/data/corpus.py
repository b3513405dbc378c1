"""Text in: the bundled corpora or a user's files, as labelled documents.

A `Document` is one file's text with the domain it belongs to. Domains are what
expert specialisation is measured against, so every downstream piece (split,
token cache, batches, per-domain perplexity) keys on `Document.domain`.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sdmoe.errors import UserError
from sdmoe.files import is_utf8_name, read_bounded, shown, stat_regular

# (file in data/corpora, domain). WikiText valid + test form ONE domain: the
# train split is not bundled, and both files are the same kind of text.
BUNDLED: tuple[tuple[str, str], ...] = (
    ("grimm-tales.txt.xz", "fairy_tales"),
    ("tinyshakespeare.txt.xz", "drama"),
    ("wikitext2-valid.txt.xz", "encyclopedia"),
    ("wikitext2-test.txt.xz", "encyclopedia"),
)


@dataclass(frozen=True)
class Document:
    domain: str
    name: str
    text: str


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK|End of (the )?Project Gutenberg)", re.M | re.I
)


def _strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's header and licence footer, if both are there.

    The footer is ~20 kB of licence: left in, it would be the held-out tail of
    the document, and "fairy tale" validation would measure legal text.
    """
    start, end = _GUTENBERG_START.search(text), None
    if start:
        end = _GUTENBERG_END.search(text, start.end())
    if not (start and end):
        return text
    return text[start.end() : end.start()].strip("\n") + "\n"


def _clean(text: str) -> str:
    # A BOM (Gutenberg files have one) or Windows line ends would otherwise
    # become tokens that say nothing about the text.
    return _strip_gutenberg(text.removeprefix("\ufeff").replace("\r\n", "\n"))


def load_bundled() -> list[Document]:
    """The four bundled files as documents in three domains (xz-compressed in the package)."""
    root = resources.files("sdmoe.data") / "corpora"
    docs = []
    for filename, domain in BUNDLED:
        raw = lzma.decompress((root / filename).read_bytes())
        docs.append(Document(domain, filename.removesuffix(".xz"), _clean(raw.decode("utf-8"))))
    return docs


# The most text --text may bring in, all files together: tokenizing 1 GiB on a CPU already
# takes hours, so more is most likely a wrong path (a disk image, a log directory). Raise it
# with the environment variable SDMOE_MAX_TEXT_BYTES when it is meant.
MAX_TEXT_BYTES = 1 << 30
_ONLY_TEXT = "pass regular UTF-8 text files (or directories of them) to --text"


def max_text_bytes() -> int:
    """MAX_TEXT_BYTES, or the SDMOE_MAX_TEXT_BYTES environment variable when set."""
    raw = os.environ.get("SDMOE_MAX_TEXT_BYTES")
    if raw is None:
        return MAX_TEXT_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"SDMOE_MAX_TEXT_BYTES={raw!r} is not a positive number of bytes; "
                        f"unset it (default {MAX_TEXT_BYTES}) or set e.g. SDMOE_MAX_TEXT_BYTES={2 * MAX_TEXT_BYTES}")
    return limit


def _files_under(directory: Path) -> list[Path]:
    """The files to read below `directory`: regular files (symlinks to them included).

    Sorted so the corpus (and everything keyed on it) does not depend on directory
    listing order; hidden files/dirs (.git, .DS_Store) are skipped; subdirectories
    are walked (symlinked ones are not followed, so a link cycle cannot recurse).
    Anything else (a FIFO, a socket, a device, a symlink loop) is an error, not
    silently left out: reading it could hang or never end.
    """
    files = []
    for p in directory.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(directory).parts):
            continue
        try:
            if stat.S_ISDIR(os.stat(p).st_mode):
                continue
        except OSError:
            pass  # a loop or broken link: stat_regular names it below
        stat_regular(p, fix=f"remove it from {shown(directory)}; {_ONLY_TEXT}")
        files.append(p)
    return sorted(files)


def _check_name(path: Path, where: Path | None = None) -> None:
    # Names become document names and domains, hashed and printed as UTF-8 text.
    if not is_utf8_name(path) or not is_utf8_name(path.resolve()):
        elsewhere = f" or move it out of {shown(where)}" if where else ""
        raise UserError(f"the file name {shown(path)} is not valid UTF-8; rename it "
                        f"(e.g. `convmv -f latin1 -t utf8 --notest`){elsewhere}")


def _read_text(path: Path, budget: int) -> tuple[str, int]:
    """The cleaned text of the regular file `path` and its size in bytes, read with a bound of `budget` bytes."""
    limit = max_text_bytes()
    data = read_bounded(
        path, budget, fix=_ONLY_TEXT,
        too_big=f"takes the text given to --text past {limit:,} bytes in all; pass less text, "
                "or raise the limit with the environment variable SDMOE_MAX_TEXT_BYTES=<bytes>",
    )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(
            f"{shown(path)} looks binary (NUL byte at byte offset {nul}); pass plain UTF-8 text files only"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{shown(path)} is not valid UTF-8 (byte offset {e.start}); convert it, e.g. "
            f"`iconv -f LATIN1 -t UTF-8 {shown(path)} > {shown(path.stem)}.utf8.txt`"
        ) from None
    text = _clean(text)
    if not text.strip():
        raise UserError(f"{shown(path)} is empty or whitespace only; remove it or add text to it")
    return text, len(data)


def load_texts(paths: list[str | Path], min_chars: int = 1) -> list[Document]:
    """User text files as documents.

    A directory is read recursively; each file's domain is the name of the
    directory that holds it (`corpus/legal/a.txt` -> "legal"), so one directory
    per domain is all a user has to arrange. A file given directly is its own
    domain, named by its stem.
    """
    docs: list[Document] = []
    seen: set[Path] = set()
    budget = max_text_bytes()  # all files together; each read stops one byte past what is left

    def read(f: Path) -> str:
        nonlocal budget
        text, size = _read_text(f, budget)
        budget -= size
        return text

    for given in paths:
        path = Path(given).expanduser()
        if not path.exists() and not path.is_symlink():
            raise UserError(f"text path {shown(path)} does not exist; check the path passed to --text")
        if path.is_dir():
            files = _files_under(path)
            if not files:
                raise UserError(f"directory {shown(path)} holds no files; put UTF-8 .txt files in it")
            root = path.resolve()
            for f in files:
                _check_name(f, where=path)
                if f.resolve() in seen:
                    continue
                seen.add(f.resolve())
                # Name relative to the given root: the fingerprint (and so the
                # caches) must not change when the corpus folder is moved.
                name = f"{root.name}/{f.relative_to(path).as_posix()}"
                docs.append(Document(f.resolve().parent.name, name, read(f)))
        else:
            stat_regular(path, fix=_ONLY_TEXT)  # a FIFO, device or symlink loop: named, before resolve() or open()
            _check_name(path)
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            docs.append(Document(path.stem, path.name, read(path)))
    total = sum(len(d.text) for d in docs)
    if total < min_chars:
        raise UserError(
            f"the text given has {total} characters in all, fewer than the {min_chars} needed; "
            "add more text or use the bundled corpora (no --text)"
        )
    return docs


def load_corpus(paths: list[str | Path] | None = None, min_chars: int = 1) -> list[Document]:
    """The user's files when `paths` is given, else the bundled corpora."""
    if not paths:
        return load_bundled()
    return load_texts(paths, min_chars=min_chars)


@dataclass
class CorpusSplit:
    """Per-domain train and validation text, one string per source document.

    Kept as lists (not joined) so the token cache can put an end-of-text token
    between documents instead of gluing unrelated text together.
    """

    train: dict[str, list[str]] = field(default_factory=dict)
    val: dict[str, list[str]] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        # Sorted: domain ids must not depend on the order paths were listed.
        return sorted(self.train)

    def fingerprint(self) -> str:
        """sha256 of the training text; what a tokenizer trained on it depends on."""
        h = hashlib.sha256()
        for domain in self.domains:
            for text in self.train[domain]:
                for part in (domain, str(len(text)), text):
                    h.update(part.encode("utf-8"))
                    h.update(b"\x00")
        return h.hexdigest()


def _cut_point(text: str, val_fraction: float) -> int:
    """Index where the held-out tail of `text` starts, moved to a line start."""
    cut = len(text) - int(round(len(text) * val_fraction))
    if cut >= len(text):
        return len(text)
    # Forward to the next line start, so no line is split between train and
    # validation; back to the previous one if the tail has no newline.
    nl = text.find("\n", cut)
    if nl >= 0 and nl + 1 < len(text):
        return nl + 1
    nl = text.rfind("\n", 0, cut)
    return nl + 1 if nl >= 0 else cut


def split_corpus(docs: list[Document], val_fraction: float = 0.05) -> CorpusSplit:
    """Hold out the last `val_fraction` of every document as its domain's validation text.

    The tail, not random lines: held-out text is then contiguous and never seen
    in training (random lines would leak neighbouring context), and the split
    is a pure function of the text.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction is {val_fraction}; use a value between 0 and 1, e.g. 0.05")
    split = CorpusSplit()
    for doc in docs:
        cut = _cut_point(doc.text, val_fraction)
        train, val = doc.text[:cut], doc.text[cut:]
        split.train.setdefault(doc.domain, [])
        split.val.setdefault(doc.domain, [])
        if train.strip():
            split.train[doc.domain].append(train)
        if val.strip():
            split.val[doc.domain].append(val)
    return split


def corpus_fingerprint(docs: list[Document]) -> str:
    """sha256 over every document's domain, name and text (in order)."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.domain, doc.name, str(len(doc.text)), doc.text):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()
