"""Saved models generate with the KV cache, and sampling flags behave as --help says."""

from __future__ import annotations

import json

import pytest

from sdmoe.models.generate import generate_text, load_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dataset):
    """A tiny model written the way `sdmoe train` writes its final model."""
    from sdmoe.models import build_model
    from sdmoe.train.config import preset
    from sdmoe.train.loop import save_final_model

    tok = tiny_dataset.tokenizer
    model = build_model(preset("tiny").model, len(tok), seed=0, eos_token_id=tok.eos_token_id)
    assert model.config.use_cache is False  # training runs without a cache
    target = tmp_path_factory.mktemp("gen") / "model"
    return save_final_model(model, tok, target)


def test_a_saved_model_turns_the_kv_cache_on(saved):
    assert json.loads((saved / "config.json").read_text())["use_cache"] is True
    assert json.loads((saved / "generation_config.json").read_text())["use_cache"] is True


def test_plain_transformers_generates_with_the_cache(saved):
    """After the first step, each forward sees one new token, not the whole prefix."""
    model, tok = load_pretrained(saved)
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    ids = tok("The king", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert lengths[0] == ids.shape[1] and lengths[1:] == [1] * 4, lengths


def test_greedy_text_is_the_same_with_and_without_the_cache(saved):
    with_cache = generate_text(saved, "The king", max_new_tokens=16, temperature=0)
    without = generate_text(saved, "The king", max_new_tokens=16, temperature=0, use_cache=False)
    assert with_cache == without
    assert with_cache.startswith("The king") and len(with_cache) > len("The king")


def test_export_turns_the_kv_cache_on(tiny_dataset):
    """convert/export (and the Trainer callback's export, which calls it) leave a model ready to save."""
    from sdmoe.method import convert, export
    from sdmoe.models import build_model
    from sdmoe.train.config import preset

    model = build_model(preset("tiny").model, len(tiny_dataset.tokenizer), seed=0)
    convert(model)
    assert model.config.use_cache is False
    export(model)
    assert model.config.use_cache is True and model.generation_config.use_cache is True


def test_top_k_0_means_no_cut(saved):
    """--top-k 0 is allowed (no top-k cut) and samples; the same seed gives the same text."""
    a = generate_text(saved, "The", max_new_tokens=6, temperature=1.0, top_k=0, seed=3)
    assert a == generate_text(saved, "The", max_new_tokens=6, temperature=1.0, top_k=0, seed=3)
    assert a.startswith("The")

