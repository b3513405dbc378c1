"""`sdmoe upcycle`: a tiny dense model, saved, becomes an ordinary transformers MoE checkpoint."""

from __future__ import annotations

import json
import os

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
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                               **{**DENSE[model_type], **over})
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
