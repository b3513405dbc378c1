"""Batches from token streams: random training windows and fixed evaluation windows.

Training batch `step` is a pure function of (seed, step): resuming at step N
gives exactly the batches an uninterrupted run would have seen, with no
iterator state to save beyond the step counter.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from sdmoe.errors import UserError

DOMAIN_WEIGHTS = ("proportional", "uniform")


class TokenBatches:
    """Random windows of `seq_len` tokens, each from one domain, `batch_size` to a batch.

    `input_ids_BS` doubles as labels: transformers causal LMs shift labels
    internally. Each row's domain is drawn with probability proportional to the
    domain's token count (the corpus as it is) or uniformly (every domain
    equally, so a small domain still trains its experts).
    """

    def __init__(
        self,
        tokens_by_domain: Mapping[str, np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        domain_weights: str = "proportional",
        domains: list[str] | None = None,
    ):
        if seq_len < 2:
            raise UserError(f"seq_len is {seq_len}; use at least 2 (one token to predict the next)")
        if batch_size < 1:
            raise UserError(f"batch_size is {batch_size}; use at least 1")
        if domain_weights not in DOMAIN_WEIGHTS:
            raise UserError(f"domain_weights is {domain_weights!r}; use one of {', '.join(DOMAIN_WEIGHTS)}")
        self.domains = list(domains) if domains is not None else sorted(tokens_by_domain)
        if not self.domains:
            raise UserError("no training text; give at least one text file or use the bundled corpora")
        self.tokens = [tokens_by_domain[d] for d in self.domains]
        for domain, toks in zip(self.domains, self.tokens):
            if len(toks) < seq_len:
                raise UserError(
                    f"domain {domain!r} has {len(toks)} training tokens, fewer than one window of "
                    f"seq_len={seq_len}; add text to it or lower seq_len"
                )
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.domain_weights = domain_weights
        counts = np.array([len(t) for t in self.tokens], dtype=np.float64)
        weights = counts if domain_weights == "proportional" else np.ones_like(counts)
        self.p_domain = weights / weights.sum()
        self.step = 0

    def sample(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step`: (input_ids_BS int64, domain_ids_B int64); the same for the same (seed, step)."""
        # A fresh generator per (seed, step): no hidden state, so any step can be
        # drawn in any order (resume, skipping, re-checking a batch).
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        domain_ids_B = rng.choice(len(self.domains), size=self.batch_size, p=self.p_domain)
        input_ids_BS = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        for b, d in enumerate(domain_ids_B):
            toks = self.tokens[d]
            start = int(rng.integers(0, len(toks) - self.seq_len + 1))
            input_ids_BS[b] = toks[start : start + self.seq_len]
        return torch.from_numpy(input_ids_BS), torch.from_numpy(domain_ids_B.astype(np.int64))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.sample(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Mapping) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """Fixed, non-overlapping windows from the start of `tokens`, as (b, seq_len) int64 batches.

    The same list every call, so evaluation numbers are comparable across steps
    and runs. The last batch may hold fewer than `batch_size` rows; at most
    `max_batches` batches; none if `tokens` is shorter than one window.
    """
    if seq_len < 2 or batch_size < 1 or max_batches < 1:
        raise UserError(
            f"eval windows need seq_len >= 2, batch_size >= 1, max_batches >= 1; "
            f"got {seq_len}, {batch_size}, {max_batches}"
        )
    n_windows = min(len(tokens) // seq_len, batch_size * max_batches)
    windows_WS = np.asarray(tokens[: n_windows * seq_len], dtype=np.int64).reshape(n_windows, seq_len)
    return [torch.from_numpy(windows_WS[i : i + batch_size].copy()) for i in range(0, n_windows, batch_size)]
