"""Small real-text corpora and a small tokenizer shared by the data tests."""

from pathlib import Path

import pytest

from sdmoe.data.corpus import load_bundled
from sdmoe.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def bundled():
    return load_bundled()


@pytest.fixture(scope="session")
def snippets(bundled) -> dict[str, str]:
    """~30 kB per domain of the bundled text, cut at line starts."""
    out = {}
    for doc in bundled:
        if doc.domain not in out:
            text = doc.text[:30_000]
            out[doc.domain] = text[: text.rfind("\n") + 1]
    return out


@pytest.fixture()
def user_corpus(tmp_path, snippets) -> Path:
    """corpus/<domain>/part-N.txt: two files per domain, like a user would lay it out."""
    root = tmp_path / "corpus"
    for domain, text in snippets.items():
        (root / domain).mkdir(parents=True)
        half = text.rfind("\n", 0, len(text) // 2) + 1
        (root / domain / "part-1.txt").write_text(text[:half], encoding="utf-8")
        (root / domain / "part-2.txt").write_text(text[half:], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def small_tokenizer(snippets):
    return train_tokenizer([snippets[d] for d in sorted(snippets)], vocab_size=512)
