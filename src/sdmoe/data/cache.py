"""Token cache: each domain's text tokenised once, kept as a flat memory-mapped array.

Tokenising a few MB takes about a second; reloading a memmap takes
milliseconds and costs no RAM until read, so every run after the first starts
at once. Entries are keyed by the text and the exact tokenizer, so a changed
corpus or tokenizer can never be served stale ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sdmoe.data.tokenizer import chunk_text
from sdmoe.files import write_bytes_atomic

# Bump when the layout of the stream changes (e.g. where separators go).
FORMAT = "tokens-v1"
_BATCH_CHUNKS = 16  # chunks per encode_batch call: big enough to use both cores


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the full tokenizer definition (vocab, merges, pre-tokenizer, specials)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _as_docs(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _entry_key(docs: list[str], tok_hash: str, eos_id: int | None) -> str:
    h = hashlib.sha256(f"{FORMAT}\x00{tok_hash}\x00{eos_id}\x00{len(docs)}".encode())
    for doc in docs:
        h.update(str(len(doc)).encode())
        h.update(b"\x00")
        h.update(doc.encode("utf-8"))
    return h.hexdigest()


def _encode_chunks(backend, chunks: list[str]) -> list[list[int]]:
    # encode_batch_fast skips offsets (not needed here); both run in parallel in Rust.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(chunks, add_special_tokens=False)]


def _chunking_is_exact(backend, chunks: list[str]) -> bool:
    """Does encoding at our chunk boundaries give the ids of encoding the joined text?

    True for byte-level BPE (ours); checked on the first boundaries so that a
    user's tokenizer with an unusual pre-tokenizer falls back to whole-text encoding.
    """
    for left, right in zip(chunks[:4], chunks[1:5]):
        a, b = left[-256:], right[:256]
        separate = _encode_chunks(backend, [a, b])
        if separate[0] + separate[1] != _encode_chunks(backend, [a + b])[0]:
            return False
    return True


def encode_documents(tokenizer, docs: list[str], desc: str = "tokenising") -> np.ndarray:
    """Token ids of `docs`, each followed by the tokenizer's eos (if it has one), as int64."""
    backend = tokenizer.backend_tokenizer
    eos_id = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    total = sum(len(d) for d in docs)
    with tqdm(total=total, desc=desc, unit="char", unit_scale=True, delay=1.0, disable=None) as bar:
        for doc in docs:
            chunks = list(chunk_text(doc))
            if not _chunking_is_exact(backend, chunks):
                chunks = [doc]
            for i in range(0, len(chunks), _BATCH_CHUNKS):
                batch = chunks[i : i + _BATCH_CHUNKS]
                for ids in _encode_chunks(backend, batch):
                    pieces.append(np.asarray(ids, dtype=np.int64))
                bar.update(sum(len(c) for c in batch))
            # eos after each document: the model sees where one text ends and
            # windows spanning two documents are marked as such.
            if eos_id is not None:
                pieces.append(np.asarray([eos_id], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _safe_name(text: str) -> str:
    # Domain names come from user directory names; keep file names portable.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "_"


def _load_entry(bin_path: Path, meta_path: Path) -> np.memmap | None:
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        n = int(meta["n_tokens"])
        if bin_path.stat().st_size != n * dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if n == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


def tokenize_to_cache(
    tokenizer,
    texts_by_domain: dict[str, str | list[str]],
    cache_dir: str | Path,
    tag: str,
) -> dict[str, np.memmap]:
    """Token ids per domain (a 1-D read-only memmap each), tokenising only what is not cached.

    `texts_by_domain[d]` is one string or a list of documents (eos goes after
    each). Stored as uint16 when the vocabulary fits, else uint32, under
    `cache_dir/tokens/` as `<tag>-<domain>-<key>.bin` plus a JSON meta file.
    """
    root = Path(cache_dir).expanduser() / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    tok_hash = tokenizer_hash(tokenizer)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    out: dict[str, np.memmap] = {}
    for domain, texts in texts_by_domain.items():
        docs = _as_docs(texts)
        key = _entry_key(docs, tok_hash, tokenizer.eos_token_id)
        stem = f"{_safe_name(tag)}-{_safe_name(domain)}-{key[:20]}"
        bin_path, meta_path = root / f"{stem}.bin", root / f"{stem}.json"
        cached = _load_entry(bin_path, meta_path)
        if cached is None:
            ids = encode_documents(tokenizer, docs, desc=f"tokenising {tag}/{domain}")
            # Data first, meta last: meta present means the .bin beside it is whole.
            write_bytes_atomic(bin_path, ids.astype(dtype).tobytes(), fsync=False)  # a cache: re-made if lost
            meta = {
                "format": FORMAT, "tag": tag, "domain": domain, "key": key,
                "tokenizer_sha256": tok_hash, "dtype": dtype.name,
                "n_tokens": int(ids.size), "n_documents": len(docs),
                "n_chars": sum(len(d) for d in docs),
            }
            write_bytes_atomic(meta_path, json.dumps(meta, indent=1).encode(), fsync=False)
            cached = _load_entry(bin_path, meta_path)
            assert cached is not None
        out[domain] = cached
    return out
