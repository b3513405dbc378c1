"""The whole analysis on a live model and on a checkpoint directory, with its outputs and errors."""

import json

import pytest

from sdmoe.analysis import analyze_model, analyze_path
from sdmoe.errors import UserError
from sdmoe.report.analysis import SECTION_TITLES


@pytest.mark.slow
def test_analyze_model_summary_and_outputs(make_model, batches, tmp_path):
    import torch

    model = make_model()
    doms = [torch.tensor([0, 1, 0, 1])] * 2
    res = analyze_model(model, batches, doms, k=4, domain_names=["a", "b"], progress=False)
    assert len(res.parameters) == 6 and len(res.gradients) == 6
    assert len(res.data) == len(res.gating) == len(res.functional) == 2
    assert res.functional[0].domains == ["a", "b"]
    text = res.summary()
    for part in ("Finding 1", "Finding 2", "Finding 3", "Functional", "random k/d = 0.1250"):
        assert part in text
    files = res.save(tmp_path / "out")
    d = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert d["meta"]["k"] == 4 and len(d["parameters"]) == 6 and "basis_DR" not in d["parameters"][0]
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 8
    for title in SECTION_TITLES.values():
        assert title in html
    assert len([f for f in files if f.endswith(".png")]) >= 8
    with pytest.raises(UserError, match="holds a previous analysis; pass --force or another --out"):
        res.save(tmp_path / "out")
    res.save(tmp_path / "out", force=True)


def test_analyze_model_layers_and_rank(make_model, batches):
    model = make_model()
    res = analyze_model(model, batches, k=2, layers=[1], progress=False)
    assert {r.layer for r in res.parameters} == {1} and res.functional[0].domain_mi_nats is None
    with pytest.raises(UserError, match=r"layers \[5\]"):
        analyze_model(model, batches, k=2, layers=[5], progress=False)
    for bad in (0, 32, -1):
        with pytest.raises(UserError, match="rank"):
            analyze_model(model, batches, k=bad, progress=False)


def test_analyze_path_end_to_end(checkpoint_dir, corpus_dir, tmp_path):
    out = tmp_path / "an"
    res = analyze_path(checkpoint_dir, text=[str(corpus_dir)], rank=4, out=out, n_batches=2, seq_len=16,
                       batch_size=4, progress=False)
    assert res.meta["domains"] == ["law", "tales"] and res.meta["n_tokens"] == 2 * 4 * 16
    assert res.functional[0].domain_mi_nats is not None
    assert (out / "analysis.json").is_file() and (out / "report.html").is_file()
    assert "Finding 1" in res.summary() and str(out) in res.summary()
    with pytest.raises(UserError, match="previous analysis"):
        analyze_path(checkpoint_dir, text=[str(corpus_dir)], rank=4, out=out, n_batches=1, seq_len=16,
                     batch_size=4, progress=False)


def test_analyze_path_bad_inputs(checkpoint_dir, corpus_dir, tmp_path):
    kw = dict(text=[str(corpus_dir)], n_batches=1, seq_len=16, batch_size=2, progress=False, write=False)
    for bad in (0, 32, 100):
        with pytest.raises(UserError, match="rank"):
            analyze_path(checkpoint_dir, rank=bad, **kw)
    with pytest.raises(UserError, match=r"layers \[9\] hold no MoE block"):
        analyze_path(checkpoint_dir, layers=[9], rank=4, **kw)
    with pytest.raises(UserError, match="fewer than the .* need"):
        analyze_path(checkpoint_dir, rank=4, **{**kw, "n_batches": 10_000})
    with pytest.raises(UserError, match="does not exist"):
        analyze_path(tmp_path / "missing", rank=4, **kw)


def test_analyze_path_dense_model_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="no MoE layers found"):
        analyze_path(tmp_path / "llama", rank=4, progress=False)


def test_analyze_path_weights_only_never_loads_the_model(checkpoint_dir, tmp_path, monkeypatch):
    import sdmoe.analysis.run as run_module

    def refuse(path):
        raise AssertionError("weights_only must not load the model")

    monkeypatch.setattr(run_module, "_load_model_and_tokenizer", refuse)
    full = analyze_path(checkpoint_dir, rank=4, write=False, weights_only=True, progress=False)
    assert full.meta["weights_only"] and full.gradients == [] and full.gating == []
    assert len(full.parameters) == 3 * len(full.meta["layers"])  # gate, up, down per layer
    out = tmp_path / "wo"
    analyze_path(checkpoint_dir, rank=4, out=out, weights_only=True, progress=False)
    assert (out / "report.html").is_file() and "Finding 1" in (out / "report.html").read_text()
