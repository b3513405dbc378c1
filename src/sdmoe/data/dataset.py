"""The data entry point: config in, tokenizer + training batches + per-domain eval batches out.

    ds = prepare_dataset(DataConfig(), seed=0)
    input_ids_BS, domain_ids_B = ds.train.sample(step)
    for input_ids_bS in ds.val["drama"]: ...
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdmoe.config_fields import check_tree
from sdmoe.data.batches import TokenBatches, eval_batches
from sdmoe.data.cache import tokenize_to_cache
from sdmoe.data.config import DataConfig
from sdmoe.data.corpus import load_corpus, split_corpus
from sdmoe.data.tokenizer import load_or_train_tokenizer
from sdmoe.errors import UserError

# Below this a corpus cannot train a tokenizer or a model worth analysing;
# saying so up front beats a confusing token-count error later.
MIN_CORPUS_CHARS = 1000


@dataclass
class Dataset:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train: TokenBatches
    val: dict[str, list[torch.Tensor]]  # domain -> fixed eval batches, each (b, seq_len) int64
    domains: list[str]  # index = domain id in TokenBatches.sample
    unigram_entropy_nats: float  # entropy of the train-token unigram distribution, nats/token
    vocab_size: int = 0  # len(tokenizer): the embedding size a model needs
    train_tokens: dict[str, np.ndarray] = field(default_factory=dict)  # domain -> 1-D ids (memmap)
    val_tokens: dict[str, np.ndarray] = field(default_factory=dict)


def resolve_cache_dir(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("SDMOE_CACHE") or "~/.cache/sdmoe").expanduser()


def _validate(cfg: DataConfig, training_tokenizer: bool) -> None:
    # vocab_size says how large a tokenizer to train: it means nothing with a given tokenizer.
    check_tree(cfg, skip=() if training_tokenizer else ("vocab_size",))


def unigram_entropy(tokens: list[np.ndarray], vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequency distribution: the loss of a
    model that ignores context, a yardstick for what a trained model learned."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for toks in tokens:
        counts += np.bincount(np.asarray(toks), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def select_domains(docs: list, domains: list[str]) -> list:
    """The documents of `domains` (all when empty); an unknown name is a one-line error naming the known."""
    if not domains:
        return docs
    known = sorted({doc.domain for doc in docs})
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise UserError(f"data.domains names {', '.join(map(repr, unknown))}, which the text does not have; "
                        f"its domains are {', '.join(known)}")
    return [doc for doc in docs if doc.domain in domains]


def truncate_tokens(train_tokens: dict[str, np.ndarray], limit: int, seq_len: int) -> dict[str, np.ndarray]:
    """The first `limit` training tokens, shared among the domains in proportion to their size (each
    keeps at least one training window, seq_len + 1 tokens)."""
    total = sum(len(t) for t in train_tokens.values())
    if limit >= total:
        return train_tokens
    if limit < (seq_len + 1) * len(train_tokens):
        raise UserError(f"data.max_train_tokens={limit} leaves less than one window of seq_len+1={seq_len + 1} "
                        f"tokens for each of the {len(train_tokens)} domains; raise it (the text has {total})")
    return {d: t[: max(seq_len + 1, round(limit * len(t) / total))] for d, t in train_tokens.items()}


def passes_over_data(steps: int, batch_size: int, seq_len: int, train_tokens: int) -> float:
    """How many times a run of `steps` steps reads its training text: tokens drawn / tokens held."""
    return steps * batch_size * seq_len / max(1, train_tokens)


def prepare_dataset(cfg: DataConfig, seed: int, tokenizer=None) -> Dataset:
    """Load, split, tokenise (cached) and batch the corpus in `cfg`.

    `tokenizer` given (e.g. a user's checkpoint's own): it is used as is and
    `cfg.vocab_size` is ignored; otherwise a byte-level BPE is trained on the
    training split (or loaded from the cache).
    """
    _validate(cfg, training_tokenizer=tokenizer is None)
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    docs = select_domains(load_corpus(cfg.text, min_chars=MIN_CORPUS_CHARS), cfg.domains)
    split = split_corpus(docs, cfg.val_fraction)
    domains = split.domains
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(split, cfg.vocab_size, cache_dir)
    train_tokens = tokenize_to_cache(tokenizer, {d: split.train[d] for d in domains}, cache_dir, "train")
    val_tokens = tokenize_to_cache(tokenizer, {d: split.val[d] for d in domains}, cache_dir, "val")

    for d in domains:
        n_val = len(val_tokens[d])
        if n_val < cfg.seq_len:
            n_chars = sum(len(t) for t in split.train[d]) + sum(len(t) for t in split.val[d])
            chars_per_token = n_chars / max(1, len(train_tokens[d]) + n_val)
            need = math.ceil(cfg.seq_len * chars_per_token / cfg.val_fraction)
            raise UserError(
                f"domain {d!r} has {n_val} validation tokens, fewer than one eval window "
                f"(seq_len={cfg.seq_len}); give it about {need} characters of text "
                f"(it has {n_chars}), or lower seq_len, or raise val_fraction"
            )

    if cfg.max_train_tokens:
        train_tokens = truncate_tokens(train_tokens, cfg.max_train_tokens, cfg.seq_len)
    train = TokenBatches(train_tokens, cfg.seq_len, cfg.batch_size, seed, cfg.domain_weights, domains)
    val = {d: eval_batches(val_tokens[d], cfg.seq_len, cfg.batch_size, cfg.eval_batches) for d in domains}
    vocab_size = len(tokenizer)
    return Dataset(
        tokenizer=tokenizer,
        train=train,
        val=val,
        domains=domains,
        unigram_entropy_nats=unigram_entropy([train_tokens[d] for d in domains], vocab_size),
        vocab_size=vocab_size,
        train_tokens=dict(train_tokens),
        val_tokens=dict(val_tokens),
    )
