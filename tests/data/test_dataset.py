import math

import pytest
import torch

from sdmoe.data import DataConfig, Dataset, prepare_dataset
from sdmoe.errors import UserError


def _cfg(corpus, tmp_path, **kw):
    base = dict(text=[str(corpus)], vocab_size=512, seq_len=32, batch_size=4, eval_batches=2,
                cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**base, **kw})


def test_user_corpus_end_to_end(user_corpus, tmp_path):
    ds = prepare_dataset(_cfg(user_corpus, tmp_path), seed=0)
    assert isinstance(ds, Dataset)
    assert ds.domains == ["drama", "encyclopedia", "fairy_tales"]
    assert ds.vocab_size == len(ds.tokenizer) == 512
    x_BS, d_B = ds.train.sample(0)
    assert x_BS.shape == (4, 32) and d_B.shape == (4,)
    assert int(x_BS.max()) < ds.vocab_size and int(d_B.max()) < len(ds.domains)
    for d in ds.domains:
        assert len(ds.val[d]) == 2 and all(b.shape == (4, 32) for b in ds.val[d])
    # Held-out text is the tail of each file: the first eval window starts in part-1's last 10%.
    first_val = ds.tokenizer.decode(ds.val["drama"][0][0])
    part1 = (user_corpus / "drama" / "part-1.txt").read_text()
    assert part1.find(first_val) > 0.9 * len(part1)
    assert 0 < ds.unigram_entropy_nats < math.log(512)

    # A second call (cache warm) gives the same tokenizer, batches and eval windows.
    again = prepare_dataset(_cfg(user_corpus, tmp_path), seed=0)
    assert again.tokenizer.get_vocab() == ds.tokenizer.get_vocab()
    assert torch.equal(again.train.sample(3)[0], ds.train.sample(3)[0])
    assert all(torch.equal(a, b) for d in ds.domains for a, b in zip(again.val[d], ds.val[d]))
    assert not torch.equal(prepare_dataset(_cfg(user_corpus, tmp_path), seed=1).train.sample(3)[0],
                           ds.train.sample(3)[0])


def test_given_tokenizer_is_used(user_corpus, tmp_path, small_tokenizer):
    ds = prepare_dataset(_cfg(user_corpus, tmp_path, vocab_size=100), seed=0, tokenizer=small_tokenizer)
    assert ds.tokenizer is small_tokenizer
    assert not (tmp_path / "cache" / "tokenizers").exists()  # nothing trained


def test_cache_dir_from_environment(user_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SDMOE_CACHE", str(tmp_path / "env-cache"))
    prepare_dataset(_cfg(user_corpus, tmp_path, cache_dir=""), seed=0)
    assert (tmp_path / "env-cache" / "tokens").is_dir()


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=1), "seq_len=1 is out of range"),
    (dict(batch_size=0), "batch_size=0 is out of range"),
    (dict(vocab_size=100), "vocab_size=100 is out of range"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(domain_weights="equal"), "domain_weights"),
    (dict(seq_len=4096), "fewer than one eval window"),
])
def test_bad_config(user_corpus, tmp_path, kw, match):
    with pytest.raises(UserError, match=match) as e:
        prepare_dataset(_cfg(user_corpus, tmp_path, **kw), seed=0)
    assert "\n" not in str(e.value)


def test_tiny_corpus_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("only a little text\n")
    with pytest.raises(UserError, match="characters"):
        prepare_dataset(_cfg(tmp_path / "a.txt", tmp_path), seed=0)


def test_bundled_corpus(tmp_path):
    """The one test on the full bundled corpus (about 4 MB of text)."""
    ds = prepare_dataset(DataConfig(vocab_size=512, seq_len=64, batch_size=8,
                                    cache_dir=str(tmp_path)), seed=0)
    assert ds.domains == ["drama", "encyclopedia", "fairy_tales"]
    assert 0 < ds.unigram_entropy_nats < math.log(ds.vocab_size)
    assert all(len(ds.val[d]) == 8 for d in ds.domains)
    assert sum(len(t) for t in ds.train_tokens.values()) > 1_000_000
