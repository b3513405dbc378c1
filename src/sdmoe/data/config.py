"""`DataConfig`: which text, how it is tokenised and batched. Imports no torch.

Each field's type and range are declared next to it (`sdmoe.config_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sdmoe.config_fields import setting

DomainWeights = Literal["proportional", "uniform"]
DOMAIN_WEIGHTS = get_args(DomainWeights)  # the same as sdmoe.data.batches.DOMAIN_WEIGHTS (tested)
# 256 byte symbols + the special token + room for merges (sdmoe.data.tokenizer.MIN_VOCAB, tested);
# token ids are stored as uint32 at most.
MIN_VOCAB, MAX_VOCAB = 260, 2**32 - 1


@dataclass
class DataConfig:
    text: list[str] = setting([])  # files/dirs; empty = bundled corpora
    vocab_size: int = setting(4096, ge=MIN_VOCAB, le=MAX_VOCAB)  # of the byte-level BPE trained on the text
    seq_len: int = setting(128, ge=2, note="one token to predict the next")
    batch_size: int = setting(16, ge=1)
    val_fraction: float = setting(0.05, gt=0, lt=1)  # the tail of each document held out
    eval_batches: int = setting(8, ge=1)  # per domain
    # where tokenizers and token ids are cached: "" -> $SDMOE_CACHE, else ~/.cache/sdmoe. A resume may
    # change it, as it may find the cache wiped: it holds only what is rebuilt from the text when missing.
    cache_dir: str = setting("", resume="any")
    domain_weights: DomainWeights = "proportional"  # "uniform": every domain equally often
    # Keep only these domains of the text (bundled: drama, encyclopedia, fairy_tales; --text: the
    # directory names); the tokenizer is trained on what is kept. Empty = every domain.
    domains: list[str] = setting([], unique=True)
    # Keep only the first N training tokens, shared among the domains in proportion to their size:
    # the way to train more passes over less text at the same step count (`sdmoe study`). 0 = all.
    max_train_tokens: int = setting(0, ge=0, note="0 = all")
