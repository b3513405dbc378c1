"""A byte-level BPE tokenizer trained on the corpus, cached by corpus and vocab size.

Byte-level (GPT-2 style): every string round-trips exactly, no `<unk>` ever
appears, and a small vocabulary (a few thousand) suits the small models this
library trains on CPU. Training is done by the Rust `tokenizers` trainer and
wrapped as a transformers `PreTrainedTokenizerFast` so checkpoints carry a
tokenizer any transformers user can load.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from sdmoe.data.corpus import CorpusSplit
from sdmoe.errors import UserError
from sdmoe.files import atomic_dir

EOS = "<|endoftext|>"
# 256 byte symbols + the special token, with a little room for merges: below
# this a "BPE" vocabulary would be bytes only.
MIN_VOCAB = 260
# Bump when the tokenizer recipe changes, so old cached tokenizers are not reused.
RECIPE = "bytebpe-v1"

# A chunk boundary is a single space between two non-space characters. Every
# pre-tokenizer regex in use (GPT-2, Llama-3, Metaspace) starts a new piece at
# " word" there, so encoding chunks separately gives exactly the ids of encoding
# the whole text, while letting the Rust side encode chunks in parallel.
_BOUNDARY = re.compile(r"\S \S")
CHUNK_CHARS = 1 << 16


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Split `text` into pieces of about `chunk_chars` at safe boundaries; "".join gives it back."""
    pos = 0
    while pos < len(text):
        m = _BOUNDARY.search(text, pos + chunk_chars)
        end = m.start() + 1 if m else len(text)
        yield text[pos:end]
        pos = end


# BPE training time grows with the square of a pre-token's length: one 300 kB run
# without whitespace takes minutes. Runs longer than this are fed to the trainer
# in pieces (training only; encoding always sees the whole text). Real words are
# far shorter, so ordinary corpora train exactly as before.
MAX_TRAIN_WORD = 1000
_LONG_RUN = re.compile(r"\S{%d,}" % (MAX_TRAIN_WORD + 1))


def cap_words(text: str, max_chars: int = MAX_TRAIN_WORD) -> Iterator[str]:
    """`text` as is, or, if it has a run of over `max_chars` non-space characters, in pieces that cut those runs."""
    pos = 0
    for m in _LONG_RUN.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()]
        for i in range(m.start(), m.end(), max_chars):
            yield text[i : min(i + max_chars, m.end())]
        pos = m.end()
    if pos == 0:
        yield text
    elif pos < len(text):
        yield text[pos:]


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab_size {vocab_size} is too small; byte-level BPE needs at least {MIN_VOCAB} "
            "(256 bytes + special token + merges), e.g. 4096"
        )
    if vocab_size > 2**32 - 1:  # ids are stored as uint32 at most
        raise UserError(f"vocab_size {vocab_size} is too large; use at most 4294967295 (e.g. 32000)")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with `vocab_size` entries (fewer if the text runs out of merges).

    Deterministic: the same texts in the same order give the same vocabulary
    and merges (the Rust trainer breaks count ties by pair id).
    """
    check_vocab_size(vocab_size)
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(s)) must give back s exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 bytes up front: text never seen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = (piece for t in texts for c in chunk_text(t) for piece in cap_words(c))
    # tqdm shows only when counting takes over a second and stderr is a terminal.
    progress = tqdm(chunks, desc="training tokenizer", unit="chunk", delay=1.0, disable=None)
    backend.train_from_iterator(progress, trainer=trainer)
    progress.close()
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around `backend`; `<|endoftext|>` serves as eos, bos, pad and unk."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,  # causal LMs mask padding by attention; a separate pad id buys nothing
        unk_token=EOS,  # byte-level never produces unk; set so `unk_token_id` is not None
        clean_up_tokenization_spaces=False,  # would break exact round-trips
    )


def tokenizer_cache_key(split: CorpusSplit, vocab_size: int) -> str:
    h = hashlib.sha256(f"{RECIPE}\x00{vocab_size}\x00{split.fingerprint()}".encode())
    return h.hexdigest()[:24]


def load_or_train_tokenizer(
    split: CorpusSplit, vocab_size: int, cache_dir: str | Path
) -> PreTrainedTokenizerFast:
    """The tokenizer for `split`'s training text, trained once and then loaded from `cache_dir/tokenizers/`."""
    check_vocab_size(vocab_size)  # fail before hashing or training anything
    root = Path(cache_dir).expanduser() / "tokenizers"
    final = root / tokenizer_cache_key(split, vocab_size)
    if (final / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(final), trust_remote_code=False)  # run no code
    texts = [t for d in split.domains for t in split.train[d]]
    tokenizer = train_tokenizer(texts, vocab_size)
    # Saved into a temp dir renamed into place: a crash mid-save never leaves a half-written
    # tokenizer that a later run would load. Another process that finished the same
    # tokenizer first keeps its copy (replace=False): theirs is identical.
    with atomic_dir(final, replace=False) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer
