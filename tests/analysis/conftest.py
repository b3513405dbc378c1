"""Tiny models, a tiny text corpus and a checkpoint directory with its tokenizer."""

import pytest
import torch

from sdmoe.models import ModelConfig, build_model

WORDS = (
    "the king and queen walked to the castle where a wolf slept under the old tree while children sang "
    "parliament passed a law on taxes and trade in the year of the war between northern states and ships "
    "romeo speaks to juliet of love and death upon the stage thou art my heart and sorrow"
).split()


def tiny_model(style="qwen3_moe", vocab=300, seed=0, **kw):
    cfg = dict(style=style, hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2, expert_ffn=16)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg), vocab, seed=seed)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Two domains of pseudo-text, ~6 kB each."""
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for domain, lo in (("tales", 0), ("law", 20)):
        (root / domain).mkdir()
        idx = torch.randint(lo, lo + 20, (1200,), generator=g).tolist()
        lines = [" ".join(WORDS[i] for i in idx[j : j + 12]) for j in range(0, 1200, 12)]
        (root / domain / "a.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, corpus_dir):
    """A save_pretrained MoE checkpoint with its own (small BPE) tokenizer."""
    from sdmoe.data.tokenizer import train_tokenizer

    texts = [p.read_text() for p in sorted(corpus_dir.rglob("*.txt"))]
    tok = train_tokenizer(texts, vocab_size=300)
    model = tiny_model(vocab=len(tok))
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 300, (4, 24), generator=g) for _ in range(2)]


@pytest.fixture()
def make_model():
    return tiny_model
