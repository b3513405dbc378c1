import json
import sys

import pytest
import yaml

from sdmoe.errors import UserError
from sdmoe.eval.tasks import (
    TaskConfig,
    build_tasks,
    cloze_examples,
    mc_examples,
    score_with_harness,
    task_names,
)

_W = ["river", "stone", "lantern", "orchard", "whisper", "falcon", "meadow", "harbor", "ember", "thistle", "copper"]
TEXT = " ".join(f"{_W[i % 11]} alpha {_W[(i * 7) % 11]}, {_W[(i * 3) % 11]}." for i in range(400))


def test_cloze_targets_are_last_content_words():
    text = ["The quick brown fox jumps over the lazy dog. " * 40]
    rows = cloze_examples(text, TaskConfig(cloze_context_words=10, n_per_domain=5), "d")
    assert len(rows) == 5
    for r in rows:
        assert len(r["context"].split()) == 10
        assert r["target"].startswith(" ") and r["target"].strip().isalpha() and len(r["target"].strip()) >= 3
    assert rows[0]["context"] == "The quick brown fox jumps over the lazy dog. The"
    assert rows[0]["target"] == " quick"


def test_multiple_choice_holds_the_true_ending():
    words = [f"w{i}" for i in range(600)]
    cfg = TaskConfig(mc_context_words=6, mc_ending_words=4, n_per_domain=20, seed=1)
    rows = mc_examples([" ".join(words)], cfg, "d")
    assert len(rows) == 20
    for j, r in enumerate(rows):
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        start = j * 10
        assert r["context"] == " ".join(words[start:start + 6])
        assert r["choices"][r["label"]] == " ".join(words[start + 6:start + 10])
    assert {r["label"] for r in rows} != {0}  # the answer's position is shuffled
    assert mc_examples([" ".join(words)], cfg, "d") == rows  # deterministic


def test_build_tasks_writes_harness_yaml(tmp_path):
    corpus = tmp_path / "corpus"
    for d in ("legal", "poems"):
        (corpus / d).mkdir(parents=True)
        (corpus / d / "a.txt").write_text(TEXT.replace("alpha", d) * 3)
    info = build_tasks(tmp_path / "tasks", text=[str(corpus)], val_fraction=0.2,
                       cfg=TaskConfig(n_per_domain=8, cloze_context_words=12, mc_context_words=8, mc_ending_words=4))
    assert set(info["tasks"]) == {"sdmoe_cloze_legal", "sdmoe_cloze_poems", "sdmoe_mc_legal", "sdmoe_mc_poems"}
    assert info["groups"] == ["sdmoe_cloze", "sdmoe_mc"]
    assert sorted(task_names(tmp_path / "tasks")) == sorted(info["tasks"])
    y = yaml.safe_load((tmp_path / "tasks" / "sdmoe_mc_legal.yaml").read_text())
    assert y["dataset_path"] == "json" and y["output_type"] == "multiple_choice"
    data = y["dataset_kwargs"]["data_files"]["test"]
    rows = [json.loads(line) for line in open(data)]
    assert len(rows) == info["counts"]["sdmoe_mc_legal"] and all(r["domain"] == "legal" for r in rows)
    c = yaml.safe_load((tmp_path / "tasks" / "sdmoe_cloze_poems.yaml").read_text())
    assert c["output_type"] == "loglikelihood" and c["target_delimiter"] == ""
    g = yaml.safe_load((tmp_path / "tasks" / "sdmoe_mc.yaml").read_text())
    assert g["task"] == ["sdmoe_mc_legal", "sdmoe_mc_poems"]


def test_without_the_harness_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"sdmoe\[eval\]"):
        score_with_harness(tmp_path, tmp_path)


def test_harness_scores_a_saved_model(tmp_path, monkeypatch, tiny_dataset, tiny_config):
    pytest.importorskip("lm_eval")  # the optional `eval` extra
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from sdmoe.models import build_model

    model = build_model(tiny_config.model, len(tiny_dataset.tokenizer), seed=0,
                        eos_token_id=tiny_dataset.tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tiny_dataset.tokenizer.save_pretrained(tmp_path / "model")
    build_tasks(tmp_path / "tasks", cfg=TaskConfig(n_per_domain=4))
    scores = score_with_harness(tmp_path / "model", tmp_path / "tasks",
                                tasks=["sdmoe_cloze_drama", "sdmoe_mc_drama"], limit=4, batch_size=4)
    assert 0.0 <= scores["sdmoe_mc_drama"]["acc"] <= 1.0
    assert scores["sdmoe_cloze_drama"]["perplexity"] > 1.0
