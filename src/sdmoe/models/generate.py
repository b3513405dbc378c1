"""Sampling text from a saved model directory (ours or any local transformers causal LM)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sdmoe.errors import UserError
from sdmoe.models.checks import check_checkpoint
from sdmoe.models.pretrained import load_pretrained_model

# Bounds of --max-new-tokens: a typo like 10**9 fails at once, not after hours of sampling.
MAX_NEW_TOKENS = 4096


def load_pretrained(path: str | Path):
    """Model and tokenizer from a local `save_pretrained` directory, with one-line errors.

    The directory is checked before transformers reads it (`check_checkpoint`: no custom code, a
    known model type, tokenizer files), and trust_remote_code=False is passed as well, so no
    checkpoint's Python ever runs and transformers never asks on stdin whether to run it.
    """
    p = Path(path).expanduser()
    check_checkpoint(p)  # config.json against the weights first: a bad field is named, not the tokenizer blamed
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise UserError(f"cannot load a tokenizer from {p} ({type(e).__name__}); save the tokenizer beside the model") from None
    return load_pretrained_model(p, checked=True).eval(), tokenizer  # one line, not a load report, if weights and config disagree


def check_generate_args(prompt: str, max_new_tokens: int, temperature: float, top_k: int) -> None:
    """The sampling arguments' ranges, checked before any model is loaded."""
    if isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = no top-k cut), got {top_k}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
        raise UserError(f"--prompt is not valid UTF-8 (at character {e.start}); pass UTF-8 text") from None


@torch.no_grad()
def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    *,
    use_cache: bool = True,
) -> str:
    """Continue `prompt` (temperature 0: greedy; top_k 0: no top-k cut) with the KV cache.

    `use_cache=True` is passed explicitly: models saved before sdmoe wrote `use_cache: true`
    carry `false` in their configs, and would recompute the whole prefix for every token.
    """
    check_generate_args(prompt, max_new_tokens, temperature, top_k)
    model, tokenizer = load_pretrained(path)
    ids = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt").input_ids
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and ids.shape[1] + max_new_tokens > context:
        raise UserError(
            f"the prompt's {ids.shape[1]} tokens plus --max-new-tokens {max_new_tokens} exceed the model's context of "
            f"{context} tokens (max_position_embeddings); pass --max-new-tokens {max(1, context - ids.shape[1])} or less"
        )
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample else None,
        pad_token_id=tokenizer.eos_token_id,
        use_cache=use_cache,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)
