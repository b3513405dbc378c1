"""Text in: the bundled corpora or a user's files, as labelled documents.

A `Document` is one file's text with the domain it belongs to. Domains are what
expert specialisation is measured against, so every downstream piece (split,
token cache, batches, per-domain perplexity) keys on `Document.domain`.
"""

from __future__ import annotations

import hashlib
import lzma
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sdmoe.errors import UserError

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


def _files_under(directory: Path) -> list[Path]:
    # Sorted so the corpus (and everything keyed on it) does not depend on
    # directory listing order; hidden files/dirs (.git, .DS_Store) are skipped.
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(
            f"{path} looks binary (NUL byte at byte offset {nul}); pass plain UTF-8 text files only"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid UTF-8 (byte offset {e.start}); convert it, e.g. "
            f"`iconv -f LATIN1 -t UTF-8 {path} > {path.stem}.utf8.txt`"
        ) from None
    text = _clean(text)
    if not text.strip():
        raise UserError(f"{path} is empty or whitespace only; remove it or add text to it")
    return text


def load_texts(paths: list[str | Path], min_chars: int = 1) -> list[Document]:
    """User text files as documents.

    A directory is read recursively; each file's domain is the name of the
    directory that holds it (`corpus/legal/a.txt` -> "legal"), so one directory
    per domain is all a user has to arrange. A file given directly is its own
    domain, named by its stem.
    """
    docs: list[Document] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"text path {path} does not exist; check the path passed to --text")
        if path.is_dir():
            files = _files_under(path)
            if not files:
                raise UserError(f"directory {path} holds no files; put UTF-8 .txt files in it")
            root = path.resolve()
            for f in files:
                if f.resolve() in seen:
                    continue
                seen.add(f.resolve())
                # Name relative to the given root: the fingerprint (and so the
                # caches) must not change when the corpus folder is moved.
                name = f"{root.name}/{f.relative_to(path).as_posix()}"
                docs.append(Document(f.resolve().parent.name, name, _read_text(f)))
        else:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            docs.append(Document(path.stem, path.name, _read_text(path)))
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
