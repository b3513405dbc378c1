"""`sdmoe upcycle`: a tiny dense model, saved, becomes an ordinary transformers MoE checkpoint."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sdmoe.cli import main
from sdmoe.errors import UserError
from sdmoe.models.upcycle import upcycle
from sdmoe.moe import find_moe_blocks

VOCAB = 512  # the tiny tokenizer's size: every id it makes has an embedding row
DENSE = {
    "qwen3": dict(head_dim=8),
    "qwen2": dict(),
    "mistral": dict(head_dim=8),
    "llama": dict(head_dim=8),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("tok")
    tiny_dataset.tokenizer.save_pretrained(out)
    return out


def _dense(tmp_path, tokenizer_dir, model_type="qwen3", seed=0, **over):
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, use_cache=False)
    cfg = AutoConfig.for_model(model_type, **{**sizes, **DENSE[model_type], **over})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path / f"dense-{model_type}"
    model.save_pretrained(path)
    for f in os.listdir(tokenizer_dir):
        (path / f).write_bytes((tokenizer_dir / f).read_bytes())
    return model.eval(), path


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type, moe_type", [("qwen3", "qwen3_moe"), ("qwen2", "qwen2_moe"),
                                                  ("mistral", "mixtral"), ("llama", "mixtral")])
def test_copy_gives_the_dense_models_logits(tmp_path, tokenizer_dir, model_type, moe_type):
    dense, path = _dense(tmp_path, tokenizer_dir, model_type)
    result = upcycle(path, tmp_path / "moe", experts=4, top_k=2, progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert moe.config.model_type == moe_type and result.layers == 2
    with torch.no_grad():
        a, b = dense(_ids()).logits, moe(_ids()).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # every non-FFN weight copied exactly; the experts start identical, the routers differ from zero
    dsd, msd = dense.state_dict(), moe.state_dict()
    for k, v in dsd.items():
        if ".mlp." not in k:
            torch.testing.assert_close(msd[k], v, rtol=0, atol=0)
    blocks = find_moe_blocks(moe)
    assert len(blocks) == 2 and blocks[0].num_experts == 4
    gate = blocks[0].gate_EFD()
    assert all(torch.equal(gate[i], gate[0]) for i in range(4)) and blocks[0].router_ED().abs().sum() > 0
    assert (tmp_path / "moe" / "tokenizer.json").is_file()


def test_noise_drop_and_granularity(tmp_path, tokenizer_dir):
    dense, path = _dense(tmp_path, tokenizer_dir)
    w = dense.model.layers[0].mlp.gate_proj.weight
    upcycle(path, tmp_path / "drop", experts=4, top_k=2, method="drop", drop_ratio=0.25, progress=False)
    block = find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "drop"))[0]
    gate, up, down = block.gate_EFD(), block.up_EFD(), block.down_EDF()
    for i in range(4):
        kept_g = (gate[i] == w).all(1)  # a neuron (row) is kept whole or re-drawn whole
        assert int((~kept_g).sum()) == 12  # 0.25 of 48 neurons
        kept_u = (up[i] == dense.model.layers[0].mlp.up_proj.weight).all(1)
        kept_d = (down[i] == dense.model.layers[0].mlp.down_proj.weight).all(0)
        assert torch.equal(kept_g, kept_u) and torch.equal(kept_g, kept_d)  # the same neurons in all three
    assert not torch.equal(gate[0], gate[1])  # each expert drops its own
    upcycle(path, tmp_path / "noise", experts=4, top_k=2, method="noise", noise=0.1, progress=False)
    g = find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "noise"))[0].gate_EFD()
    rel = float((g[0] - w).std() / w.std())
    assert 0.05 < rel < 0.2 and not torch.equal(g[0], g[1])
    upcycle(path, tmp_path / "fine", experts=8, top_k=4, granularity=4, progress=False)
    b = find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "fine"))[0]
    assert b.expert_ffn == 12 and torch.equal(b.gate_EFD()[5], w[12:24])  # expert 5: segment 1 of 4
    torch.testing.assert_close(b.down_EDF()[5], 4 * dense.model.layers[0].mlp.down_proj.weight[:, 12:24])


def test_the_cli_writes_one_shard_a_layer(tmp_path, tokenizer_dir, capsys):
    _, path = _dense(tmp_path, tokenizer_dir)
    assert main(["upcycle", str(path), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "moe"),
                 "--quiet"]) == 0
    assert "qwen3_moe MoE of 4 experts" in capsys.readouterr().out
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # the embedding, one shard a layer, the LM head


def _error(capsys, argv) -> str:
    capsys.readouterr()  # what the test's own saving printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, match", [
    (["--experts", "1", "--top-k", "1"], "at least 2 experts"),
    (["--experts", "4", "--top-k", "5"], "--top-k 5"),
    (["--experts", "4", "--top-k", "2", "--granularity", "5"], "does not divide the FFN width 48"),
    (["--experts", "6", "--top-k", "2", "--granularity", "4"], "not a multiple of --granularity"),
    (["--experts", "4", "--top-k", "2", "--method", "merge"], "--method 'merge'"),
    (["--experts", "4", "--top-k", "2", "--shared-expert"], "qwen3_moe has no shared expert"),
    (["--top-k", "2"], "--experts is missing: give the routed experts per layer"),
    (["--experts", "4", "--top-k", "2", "--non-expert-from", "base"], "it needs --experts-from DIR"),
    (["--experts", "4", "--top-k", "2", "--non-expert-from", "mean"], "--non-expert-from 'mean'"),
])
def test_bad_requests_say_one_line_and_write_nothing(tmp_path, tokenizer_dir, capsys, extra, match):
    _, path = _dense(tmp_path, tokenizer_dir)
    err = _error(capsys, ["upcycle", str(path), "--out", str(tmp_path / "moe"), *extra])
    assert match in err
    assert not (tmp_path / "moe").exists()


def test_bad_checkpoints_say_one_line(tmp_path, tokenizer_dir, capsys):
    _, path = _dense(tmp_path, tokenizer_dir)
    upcycle(path, tmp_path / "moe", experts=4, top_k=2, progress=False)
    out = ["--experts", "4", "--top-k", "2", "--out", str(tmp_path / "again")]
    assert "already an MoE" in _error(capsys, ["upcycle", str(tmp_path / "moe"), *out])
    # an unsupported family names the supported ones
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    assert "supported: qwen3 -> qwen3_moe" in _error(capsys, ["upcycle", str(path), *out])
    (path / "config.json").write_text(json.dumps({**config, "model_type": "olmo2"}))
    assert "OLMo-2 cannot be upcycled" in _error(capsys, ["upcycle", str(path), *out])
    # custom code is never run
    (path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert "custom code" in _error(capsys, ["upcycle", str(path), *out])
    # weights that disagree with config.json: one line, before transformers prints a load report
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    assert "has shape [32, 48] but config.json gives [32, 64]" in _error(capsys, ["upcycle", str(path), *out])
    # a FIFO where the weights file should be: one line, never a read that blocks
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")
    assert "not a regular file" in _error(capsys, ["upcycle", str(path), *out])
    assert not (tmp_path / "again").exists()
    # an --out that holds something is never overwritten
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "b").mkdir()
    _, other = _dense(tmp_path / "b", tokenizer_dir)
    assert "is a directory that is not empty" in _error(capsys, ["upcycle", str(other), "--experts", "4", "--top-k", "2",
                                                       "--out", str(tmp_path / "full")])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_densify_saves_a_one_expert_moe_as_the_dense_model_it_computes(tmp_path, tiny_dataset):
    from sdmoe.models import ModelConfig, build_model
    from sdmoe.models.upcycle import densify

    tok = tiny_dataset.tokenizer
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=1, top_k=1,
                      expert_ffn=24)
    moe = build_model(cfg, len(tok), seed=0, eos_token_id=tok.eos_token_id).eval()
    moe.save_pretrained(tmp_path / "one")
    tok.save_pretrained(tmp_path / "one")
    densify(tmp_path / "one", tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert dense.config.model_type == "qwen3" and dense.config.intermediate_size == 24
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, moe(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="not a one-expert qwen3_moe"):
        densify(tmp_path / "dense", tmp_path / "again")


def _both_json(a, b, name):
    return json.loads((a / name).read_text()), json.loads((b / name).read_text())


@pytest.mark.parametrize("model_type, dtype", [("qwen3", torch.float32), ("qwen2", torch.float32),
                                               ("mistral", torch.bfloat16), ("llama", torch.float32)])
def test_config_json_is_what_save_pretrained_writes(tmp_path, tokenizer_dir, model_type, dtype):
    dense, path = _dense(tmp_path, tokenizer_dir, model_type)
    dense.to(dtype).save_pretrained(path)
    (path / "generation_config.json").unlink()  # written as save_pretrained would, when the dense model has none
    upcycle(path, tmp_path / "moe", experts=4, top_k=2, progress=False)
    # the same config, through transformers' own save path: the model class built from it, save_pretrained
    cfg = AutoConfig.from_pretrained(tmp_path / "moe")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ref")
    ours, ref = _both_json(tmp_path / "moe", tmp_path / "ref", "config.json")
    assert ours == ref  # key for key: architectures, dtype, transformers_version included
    assert ours["architectures"] == [type(AutoModelForCausalLM.from_config(cfg)).__name__]
    assert ours["dtype"] == str(dtype).removeprefix("torch.")
    assert _both_json(tmp_path / "moe", tmp_path / "ref", "generation_config.json")[0] == \
        _both_json(tmp_path / "moe", tmp_path / "ref", "generation_config.json")[1]
    # loaded as save_pretrained's own output is: in the weights' dtype
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype="auto").dtype == dtype


def test_the_dense_generation_config_is_kept(tmp_path, tokenizer_dir):
    _, path = _dense(tmp_path, tokenizer_dir)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.25, "do_sample": True}))
    upcycle(path, tmp_path / "moe", experts=4, top_k=2, progress=False)
    assert json.loads((tmp_path / "moe" / "generation_config.json").read_text())["temperature"] == 0.25


def test_the_shared_expert_and_the_routed_ones_sum_to_the_dense_ffn(tmp_path, tokenizer_dir):
    dense, path = _dense(tmp_path, tokenizer_dir, "qwen2")
    upcycle(path, tmp_path / "moe", experts=4, top_k=2, shared_expert=True, progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(_ids()).logits, dense(_ids()).logits, rtol=0, atol=1e-5)
    mlp, block = dense.model.layers[0].mlp, moe.model.layers[0].mlp
    # the shared expert is the whole FFN (its gate zero: sigmoid 1/2), every routed expert half of it
    assert torch.equal(block.shared_expert.down_proj.weight, mlp.down_proj.weight)
    assert torch.equal(block.shared_expert_gate.weight, torch.zeros(1, 32))
    down = find_moe_blocks(moe)[0].down_EDF()
    assert all(torch.equal(down[i], 0.5 * mlp.down_proj.weight) for i in range(4))
    # both halves carry the function: silencing either changes the logits
    with torch.no_grad():
        for silence in (block.shared_expert.down_proj.weight, block.experts.down_proj):
            kept = silence.clone()
            silence.zero_()
            assert (moe(_ids()).logits - dense(_ids()).logits).abs().max() > 1e-3
            silence.copy_(kept)


def _fine_tune(base, path, tokenizer_dir, seed, ffn=True, rest=False):
    """A 'fine-tune' of `base`: its FFNs (and with `rest` every other weight) moved by a seeded amount."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if (".mlp." in name and ffn) or (".mlp." not in name and rest):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ft.save_pretrained(path)
    for f in os.listdir(tokenizer_dir):
        (path / f).write_bytes((tokenizer_dir / f).read_bytes())
    return ft.eval()


def _force_expert(moe, i):
    """Route every token of every layer to expert i alone (weight 1)."""
    def hook(module, args, out):
        n = out[0].shape[0]
        return out[0], torch.ones(n, 1, dtype=out[1].dtype), torch.full((n, 1), i, dtype=out[2].dtype)
    return [layer.mlp.gate.register_forward_hook(hook) for layer in moe.model.layers]


def test_btx_expert_i_computes_fine_tune_i(tmp_path, tokenizer_dir):
    base, path = _dense(tmp_path, tokenizer_dir)
    tunes = [_fine_tune(base, tmp_path / f"ft{i}", tokenizer_dir, seed=10 + i) for i in range(3)]
    result = upcycle(path, tmp_path / "btx", None, top_k=1, experts_from=[tmp_path / f"ft{i}" for i in range(3)],
                     non_expert_from="base", progress=False)
    assert result.experts == 3 and "experts from 3 fine-tunes" in result.summary()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "btx").eval()
    with torch.no_grad():
        for i, tune in enumerate(tunes):
            hooks = _force_expert(moe, i)
            got = moe(_ids()).logits
            for h in hooks:
                h.remove()
            torch.testing.assert_close(got, tune(_ids()).logits, rtol=0, atol=1e-5)
            assert (got - base(_ids()).logits).abs().max() > 1e-3  # the fine-tune's FFN, not the base's
    # a multiple of the fine-tunes: expert i from fine-tune i mod 3
    upcycle(path, tmp_path / "btx6", 6, top_k=2, experts_from=[tmp_path / f"ft{i}" for i in range(3)], progress=False)
    gate = find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "btx6"))[0].gate_EFD()
    assert torch.equal(gate[4], tunes[1].model.layers[0].mlp.gate_proj.weight)


@pytest.mark.parametrize("non_expert_from", ["average", "base"])
def test_btx_non_expert_weights_average_or_base(tmp_path, tokenizer_dir, non_expert_from):
    base, path = _dense(tmp_path, tokenizer_dir)
    tunes = [_fine_tune(base, tmp_path / f"ft{i}", tokenizer_dir, seed=20 + i, rest=True) for i in range(2)]
    upcycle(path, tmp_path / "btx", None, top_k=1, experts_from=[tmp_path / "ft0", tmp_path / "ft1"],
            non_expert_from=non_expert_from, progress=False)
    msd = AutoModelForCausalLM.from_pretrained(tmp_path / "btx").state_dict()
    bsd, sds = base.state_dict(), [t.state_dict() for t in tunes]
    for k in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        want = (sds[0][k] + sds[1][k]) / 2 if non_expert_from == "average" else bsd[k]
        torch.testing.assert_close(msd[k], want, rtol=0, atol=1e-6)
        assert (msd[k] - bsd[k]).abs().max() > (1e-3 if non_expert_from == "average" else -1)


def _mutate(path, tokenizer_dir, tmp_path, how):
    if how == "family":  # a llama of the same shapes as the mistral base
        _dense(tmp_path / "other", tokenizer_dir, "llama")
        return tmp_path / "other" / "dense-llama"
    if how == "shapes":
        _dense(tmp_path / "other", tokenizer_dir, "mistral", intermediate_size=64)
        return tmp_path / "other" / "dense-mistral"
    ft = tmp_path / "ft"
    shutil.copytree(path, ft)
    if how == "config":
        cfg = json.loads((ft / "config.json").read_text())
        (ft / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    if how == "vocabulary":
        tok = json.loads((ft / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[300:302]
        vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, other ids
        (ft / "tokenizer.json").write_text(json.dumps(tok))
    return ft


@pytest.mark.parametrize("how, extra, match", [
    ("family", [], "is a 'llama' model but"),
    ("shapes", [], "has shape [32, 64] but"),
    ("config", [], "config.json has rms_norm_eps=0.001 but"),
    ("vocabulary", [], "vocabulary (tokenizer.json) differs from"),
    ("same", ["--experts", "3"], "--experts 3 is not a multiple of the 2 --experts-from directories"),
    ("same", ["--granularity", "2"], "--granularity 2 with --experts-from"),
])
def test_btx_refuses_fine_tunes_of_another_model_in_one_line(tmp_path, tokenizer_dir, capsys, how, extra, match):
    _, path = _dense(tmp_path, tokenizer_dir, "mistral")
    ft = _mutate(path, tokenizer_dir, tmp_path, how)
    err = _error(capsys, ["upcycle", str(path), "--top-k", "1", "--out", str(tmp_path / "btx"), *extra,
                          "--experts-from", str(path), str(ft)])
    assert match in err, err
    assert not (tmp_path / "btx").exists()
