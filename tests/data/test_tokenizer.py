import pytest

from sdmoe.data.corpus import Document, split_corpus
from sdmoe.data.tokenizer import chunk_text, load_or_train_tokenizer, train_tokenizer
from sdmoe.errors import UserError

SAMPLES = [
    "Before we proceed any further, hear me speak.\n\nAll:\n  Speak,  speak.\t\n",
    " = Robert <unk> = \n \n Robert <unk> is an English film , television actor .",
    "Grüße aus Köln — naïve café, 東京, emoji 🙂 and Ω≈ç√ at the end",
    "",
]


def test_round_trip_ascii_and_utf8(small_tokenizer):
    for s in SAMPLES:
        ids = small_tokenizer(s)["input_ids"]
        assert all(0 <= i < len(small_tokenizer) for i in ids)
        assert small_tokenizer.decode(ids) == s


def test_special_tokens(small_tokenizer):
    tok = small_tokenizer
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id is not None
    assert len(tok) == 512
    # No special tokens are added by a plain call: the stream decides where eos goes.
    assert tok.eos_token_id not in tok("hello world")["input_ids"]


def test_same_text_same_vocab(snippets):
    texts = [snippets[d] for d in sorted(snippets)]
    a = train_tokenizer(texts, vocab_size=400)
    b = train_tokenizer(texts, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    c = train_tokenizer(texts[:1], vocab_size=400)
    assert c.get_vocab() != a.get_vocab()


def test_vocab_too_small():
    with pytest.raises(UserError, match="vocab_size 259"):
        train_tokenizer(["some text"], vocab_size=259)


def test_chunking_is_exact(small_tokenizer, snippets):
    text = snippets["encyclopedia"] + snippets["drama"]
    chunks = list(chunk_text(text, chunk_chars=1000))
    assert len(chunks) > 10 and "".join(chunks) == text
    backend = small_tokenizer.backend_tokenizer
    chunked = [i for c in chunks for i in backend.encode(c, add_special_tokens=False).ids]
    assert chunked == backend.encode(text, add_special_tokens=False).ids


def test_load_or_train_caches(tmp_path, snippets):
    docs = [Document(d, d, t) for d, t in snippets.items()]
    split = split_corpus(docs, 0.1)
    first = load_or_train_tokenizer(split, 300, tmp_path)
    (entry,) = (tmp_path / "tokenizers").iterdir()  # one entry, no temp dirs left behind
    assert (entry / "tokenizer.json").is_file()
    mtime = (entry / "tokenizer.json").stat().st_mtime_ns
    again = load_or_train_tokenizer(split, 300, tmp_path)
    assert again.get_vocab() == first.get_vocab()
    assert again.eos_token == first.eos_token and again.pad_token_id == first.pad_token_id
    assert again.decode(again(SAMPLES[2])["input_ids"]) == SAMPLES[2]
    assert (entry / "tokenizer.json").stat().st_mtime_ns == mtime
    load_or_train_tokenizer(split, 320, tmp_path)  # other vocab size: other entry
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
