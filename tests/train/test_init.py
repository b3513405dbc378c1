"""`train --init` and `compare --init`: starting from a trained MoE, or an upcycled dense model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sdmoe.cli import main
from sdmoe.models import ModelConfig, build_model
from sdmoe.models.upcycle import upcycle
from sdmoe.moe import find_moe_blocks
from sdmoe.train.metrics import read_metrics

TRAIN = ["train", "--preset", "tiny", "--quiet", "--steps", "6", "--set", "loop.eval_every=6",
         "--set", "loop.monitor_every=0", "--set", "loop.threads=1"]


@pytest.fixture()
def moe_ckpt(tmp_path, tiny_dataset):
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=16)
    model = build_model(cfg, len(tiny_dataset.tokenizer), seed=3, eos_token_id=tiny_dataset.tokenizer.eos_token_id)
    path = tmp_path / "trained-moe"
    model.save_pretrained(path)
    tiny_dataset.tokenizer.save_pretrained(path)
    return path


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("method", ["baseline", "sd-moe"])
def test_train_continues_a_trained_moe_from_its_weights(tmp_path, moe_ckpt, method):
    out = tmp_path / method
    assert main([*TRAIN, "--init", str(moe_ckpt), "--method", method, "--out", str(out),
                 "--set", "sdmoe.split_step=0"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["init"] == str(moe_ckpt.resolve())
    assert run["config"]["model"]["expert_ffn"] == 16 and run["config"]["model"]["num_experts"] == 4
    records = read_metrics(out / "metrics.jsonl")
    if method == "sd-moe":  # the split at the first step of a continued run changes no logit
        split = next(r for r in records if r.get("event") == "split")
        assert split["step"] == 0 and split["logits_rel_change"] < 1e-5
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(moe_ckpt)
    fresh = build_model(ModelConfig(**run["config"]["model"]), trained.config.vocab_size, seed=0)  # the run's seed
    assert trained.config.model_type == "qwen3_moe"
    w, w0, wf = (find_moe_blocks(m)[0].gate_EFD() for m in (trained, start, fresh))
    assert not torch.equal(w, w0)  # trained, and from the checkpoint's weights, not from a new model's
    assert (w - w0).norm() < 0.5 * (w - wf).norm()  # measured: 0.30 against 1.31
    assert (out / "model" / "tokenizer.json").is_file()


def test_upcycled_dense_qwen3_trains_with_both_methods(tmp_path, tiny_dataset):
    tok = tiny_dataset.tokenizer
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=32, head_dim=16,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg)
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=4, top_k=2, progress=False)
    for method in ("baseline", "sd-moe"):
        assert main([*TRAIN, "--init", str(tmp_path / "moe"), "--method", method, "--out", str(tmp_path / method),
                     "--set", "sdmoe.split_step=2"]) == 0
    # copied experts start identical (overlap 1.0); the paired runs started from the same weights
    a = json.loads((tmp_path / "baseline" / "run.json").read_text())["val_loss"]["mean"]
    b = json.loads((tmp_path / "sd-moe" / "run.json").read_text())["val_loss"]["mean"]
    assert abs(a - b) < 0.5


def _own_tokenizer(path, vocab: int = 300):
    """A tokenizer unlike the bundled BPE (another vocabulary size), saved into `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["The king said to the queen that the fairy would come.", "Rivers flow into the sea in spring."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


@pytest.mark.slow
def test_compare_pairs_baseline_and_sd_moe_from_the_checkpoint(tmp_path):
    path = tmp_path / "own-moe"
    tok = _own_tokenizer(path)
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=16)
    build_model(cfg, len(tok), seed=1, eos_token_id=tok.eos_token_id).save_pretrained(path)
    assert main(["compare", "--preset", "tiny", "--init", str(path), "--steps", "6", "--seeds", "2", "--quiet",
                 "--out", str(tmp_path / "cmp"), "--set", "sdmoe.split_step=1"]) == 0
    moe_ckpt = path
    final = tmp_path / "cmp" / "runs" / "qwen3_moe" / "sd-moe" / "lr1" / "seed1" / "model"
    # the text was tokenised with the checkpoint's own tokenizer, not a BPE trained on it
    assert (final / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    runs = sorted((tmp_path / "cmp" / "runs").glob("*/*/*/*/run.json"))
    # 2 seeds x (baseline, sd-moe) and the same-seed rerun of the baseline, all of the checkpoint's style
    assert len(runs) == 5 and {p.parts[-5] for p in runs} == {"qwen3_moe"}
    assert all(json.loads(p.read_text())["config"]["init"] == str(moe_ckpt.resolve()) for p in runs)


def test_bad_init_says_one_line(tmp_path, moe_ckpt, tiny_dataset, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert "--set model.hidden_size with --init" in _error(
        capsys, [*TRAIN, "--init", str(moe_ckpt), "--set", "model.hidden_size=64", *out])
    assert "--style mixtral with --init" in _error(capsys, [*TRAIN, "--init", str(moe_ckpt), "--style", "mixtral", *out])
    # a dense checkpoint is pointed to upcycle
    cfg = AutoConfig.for_model("qwen3", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    tiny_dataset.tokenizer.save_pretrained(tmp_path / "dense")
    assert "sdmoe upcycle" in _error(capsys, [*TRAIN, "--init", str(tmp_path / "dense"), *out])
    # no tokenizer.json
    (moe_ckpt / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (moe_ckpt / "vocab.json").write_text("{}")  # a tokenizer file of another kind: still not tokenizer.json
    assert "no tokenizer.json" in _error(capsys, [*TRAIN, "--init", str(moe_ckpt), *out])
    (tmp_path / "tokenizer.json").rename(moe_ckpt / "tokenizer.json")
    # weights that disagree with config.json: one line, no load report
    config = json.loads((moe_ckpt / "config.json").read_text())
    (moe_ckpt / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 24}))
    assert "has shape [4, 32, 16] but config.json gives [4, 32, 24]" in _error(
        capsys, [*TRAIN, "--init", str(moe_ckpt), *out])
    assert "but config.json gives [4, 32, 24]" in _error(capsys, ["generate", str(moe_ckpt), "--prompt", "The king"])
    (moe_ckpt / "config.json").write_text(json.dumps(config))
    # custom code is never run
    (moe_ckpt / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    assert "custom code" in _error(capsys, [*TRAIN, "--init", str(moe_ckpt), *out])
    (moe_ckpt / "config.json").write_text(json.dumps(config))
    assert not (tmp_path / "run").exists()


def test_a_fifo_for_the_weights_never_blocks_a_loader(tmp_path, moe_ckpt, capsys):
    (moe_ckpt / "model.safetensors").unlink()
    os.mkfifo(moe_ckpt / "model.safetensors")
    for argv in (["analyze", str(moe_ckpt), "--out", str(tmp_path / "a")],
                 ["analyze", str(moe_ckpt), "--weights-only", "--out", str(tmp_path / "b")],
                 ["generate", str(moe_ckpt), "--prompt", "The king"],
                 [*TRAIN, "--init", str(moe_ckpt), "--out", str(tmp_path / "run")]):
        assert "not a regular file" in _error(capsys, argv)


def test_a_continued_run_splits_at_the_first_step_unless_told_otherwise(tmp_path, moe_ckpt):
    """From a trained model SD-MoE needs no warm-up: `--init` splits at step 0 (the tiny preset's own
    split_step is 5, past these 4 steps); a --set or a config file that names the step still wins."""
    def split_step(out, *extra):
        assert main([*TRAIN, "--steps", "4", "--init", str(moe_ckpt), "--method", "sd-moe", "--out", str(out),
                     *extra]) == 0
        return next(r["step"] for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "split")

    assert split_step(tmp_path / "default") == 0
    assert split_step(tmp_path / "set", "--set", "sdmoe.split_step=2") == 2
    (tmp_path / "c.json").write_text(json.dumps({"preset": "tiny", "sdmoe": {"split_step": 3}}))
    assert split_step(tmp_path / "file", "--config", str(tmp_path / "c.json")) == 3
