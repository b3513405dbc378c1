import pytest

from sdmoe.data.corpus import (
    Document,
    corpus_fingerprint,
    load_corpus,
    load_texts,
    split_corpus,
)
from sdmoe.errors import UserError


def test_bundled_domains_and_cleaning(bundled):
    assert [d.domain for d in bundled] == ["fairy_tales", "drama", "encyclopedia", "encyclopedia"]
    grimm = bundled[0].text
    assert not grimm.startswith("\ufeff")
    assert "FULL PROJECT GUTENBERG LICENSE" not in grimm  # licence footer stripped
    assert "LITTLE TABLE SET THYSELF" in grimm
    assert all(len(d.text) > 100_000 for d in bundled)
    assert load_corpus(None) == bundled and load_corpus([]) == bundled


def test_split_is_deterministic_and_holds_out_tail(bundled):
    a, b = split_corpus(bundled, 0.05), split_corpus(bundled, 0.05)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert a.domains == ["drama", "encyclopedia", "fairy_tales"]
    assert len(a.train["encyclopedia"]) == len(a.val["encyclopedia"]) == 2
    for doc in bundled:
        i = [d for d in bundled if d.domain == doc.domain].index(doc)
        train, val = a.train[doc.domain][i], a.val[doc.domain][i]
        assert train + val == doc.text  # tail held out, nothing lost or reordered
        assert train.endswith("\n")  # cut at a line boundary
        assert 0.03 < len(val) / len(doc.text) < 0.07
    assert split_corpus(bundled, 0.1).fingerprint() != a.fingerprint()


def test_domain_labels_from_directories(tmp_path):
    root = tmp_path / "corpus"
    (root / "legal").mkdir(parents=True)
    (root / "medical" / "deep").mkdir(parents=True)
    (root / "legal" / "b.txt").write_text("the court held the contract void\n" * 5)
    (root / "legal" / "a.txt").write_text("the appeal was dismissed with costs\n" * 5)
    (root / "legal" / ".hidden.txt").write_text("\x00 not read")
    (root / "medical" / "deep" / "c.md").write_text("the patient presented with fever\n" * 5)
    single = tmp_path / "poems.txt"
    single.write_text("roses are red, violets are blue\n" * 5)

    docs = load_texts([root, single])
    assert [(d.domain, d.name) for d in docs] == [
        ("legal", "corpus/legal/a.txt"),
        ("legal", "corpus/legal/b.txt"),
        ("deep", "corpus/medical/deep/c.md"),
        ("poems", "poems.txt"),
    ]
    # A directory that is itself one domain labels its files with its own name.
    assert {d.domain for d in load_texts([root / "legal"])} == {"legal"}
    # The same file reached twice is read once.
    assert len(load_texts([root / "legal", root / "legal" / "a.txt"])) == 2


def test_user_text_cleaning(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes("\ufeffline one\r\nline two\r\n".encode("utf-8"))
    (doc,) = load_texts([f])
    assert doc.text == "line one\nline two\n"


def _error(paths, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_texts(paths, **kw)
    msg = str(e.value)
    assert "\n" not in msg and ";" in msg  # one line: problem; fix
    return msg


def test_bad_inputs_give_one_line_user_errors(tmp_path):
    assert "does not exist" in _error([tmp_path / "nope"])
    (tmp_path / "empty_dir").mkdir()
    assert "holds no files" in _error([tmp_path / "empty_dir"])
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in _error([tmp_path / "empty.txt"])
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    assert "whitespace" in _error([tmp_path / "blank.txt"])
    (tmp_path / "bin.dat").write_bytes(b"abc\x00def")
    assert "byte offset 3" in _error([tmp_path / "bin.dat"])
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    msg = _error([tmp_path / "latin1.txt"])
    assert "latin1.txt" in msg and "byte offset 3" in msg and "iconv" in msg
    (tmp_path / "short.txt").write_text("too short")
    assert "9 characters" in _error([tmp_path / "short.txt"], min_chars=100)


def test_bad_val_fraction(bundled):
    for frac in (0.0, 1.0, -0.1):
        with pytest.raises(UserError):
            split_corpus(bundled[:1], frac)


def test_fingerprint_tracks_content():
    a = [Document("x", "a.txt", "hello\n")]
    assert corpus_fingerprint(a) == corpus_fingerprint(list(a))
    assert corpus_fingerprint(a) != corpus_fingerprint([Document("y", "a.txt", "hello\n")])
    assert corpus_fingerprint(a) != corpus_fingerprint([Document("x", "a.txt", "hello!\n")])
