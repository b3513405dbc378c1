"""Sampling text from a saved model directory (ours or any local transformers causal LM)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdmoe.errors import UserError

# Files one of which a saved tokenizer always has (fast, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_pretrained(path: str | Path):
    """Model and tokenizer from a local `save_pretrained` directory, with one-line errors."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} is not a directory; pass a model directory such as runs/demo/model")
    if not (p / "config.json").is_file():
        hint = " (the trained model is in its model/ subdirectory)" if (p / "model" / "config.json").is_file() else ""
        raise UserError(f"{p} has no config.json{hint}; pass a directory written by save_pretrained")
    # transformers 5 builds an EMPTY tokenizer from config.json alone; without its files, say so.
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{p} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "save the tokenizer beside the model (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise UserError(f"cannot load a tokenizer from {p} ({type(e).__name__}); save the tokenizer beside the model") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the model in {p} ({type(e).__name__}: {str(e)[:120]}); check the weights are complete") from None
    return model.eval(), tokenizer


@torch.no_grad()
def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    model, tokenizer = load_pretrained(path)
    ids = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample else None,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)
