import numpy as np

from sdmoe.data.cache import tokenize_to_cache


def _files(root):
    return sorted((root / "tokens").iterdir())


def test_tokenise_store_and_reuse(tmp_path, small_tokenizer, snippets):
    tok = small_tokenizer
    texts = {"drama": [snippets["drama"][:5000], snippets["drama"][5000:9000]], "encyclopedia": snippets["encyclopedia"]}
    first = tokenize_to_cache(tok, texts, tmp_path, "train")
    assert set(first) == {"drama", "encyclopedia"}
    assert all(isinstance(v, np.memmap) and v.dtype == np.uint16 for v in first.values())

    # Same ids as encoding each document, with eos after each document.
    docs = texts["drama"]
    expected = tok(docs[0])["input_ids"] + [tok.eos_token_id] + tok(docs[1])["input_ids"] + [tok.eos_token_id]
    assert first["drama"].tolist() == expected
    assert tok.decode(first["encyclopedia"][:-1].tolist()) == snippets["encyclopedia"]

    files = _files(tmp_path)
    assert len(files) == 4  # a .bin and a .json per domain, no temp files
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = tokenize_to_cache(tok, texts, tmp_path, "train")
    assert {f: f.stat().st_mtime_ns for f in _files(tmp_path)} == mtimes  # cache hit: nothing rewritten
    assert np.array_equal(again["drama"], first["drama"])

    changed = dict(texts, encyclopedia=snippets["encyclopedia"] + "One more line .\n")
    third = tokenize_to_cache(tok, changed, tmp_path, "train")
    assert len(_files(tmp_path)) == 6  # new entry for the changed domain only
    assert len(third["encyclopedia"]) > len(first["encyclopedia"])


def test_truncated_entry_is_rebuilt(tmp_path, small_tokenizer):
    out = tokenize_to_cache(small_tokenizer, {"d": "a few words of text\n"}, tmp_path, "val")
    ids = out["d"].tolist()
    (bin_path,) = (tmp_path / "tokens").glob("*.bin")
    del out
    bin_path.write_bytes(b"\x01")  # e.g. disk filled up by another writer
    assert tokenize_to_cache(small_tokenizer, {"d": "a few words of text\n"}, tmp_path, "val")["d"].tolist() == ids


def test_foreign_tokenizer_falls_back_to_whole_text(small_tokenizer, snippets):
    """A tokenizer whose pieces depend on chunk edges (here: strips whitespace) is encoded whole."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from sdmoe.data.cache import encode_documents

    backend = Tokenizer.from_str(small_tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Strip()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    text = snippets["encyclopedia"] * 3  # > one chunk
    ids = encode_documents(tok, [text]).tolist()
    assert ids == backend.encode(text, add_special_tokens=False).ids + [tok.eos_token_id]
