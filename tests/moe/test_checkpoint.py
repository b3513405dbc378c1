"""Lazy layer-by-layer reading of expert weights from checkpoint directories."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from sdmoe.errors import UserError
from sdmoe.models import ModelConfig, build_model
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.checkpoint import ExpertCheckpoint, iter_expert_layers, weights_of_block

VOCAB = 300


def _tiny(style="qwen3_moe"):
    cfg = ModelConfig(style=style, hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2, expert_ffn=16)
    return build_model(cfg, VOCAB, seed=3)


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """save_pretrained: transformers 5 writes per-expert (module-list) names."""
    d = tmp_path_factory.mktemp("listed")
    model.save_pretrained(d)
    return d


def _write_fused(model, d, dtype=torch.float32):
    """The in-memory transformers 5 names (fused 3-D experts), written by hand."""
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(model.config.to_json_string())
    return d


def _assert_same(ckpt_layers, model):
    blocks = find_moe_blocks(model)
    assert [lw.layer for lw in ckpt_layers] == [b.layer for b in blocks]
    for lw, b in zip(ckpt_layers, blocks):
        live = weights_of_block(b)
        for (n, a), (_, c) in zip(lw.projections().items(), live.projections().items()):
            assert a.shape == c.shape and torch.equal(a.float(), c.float()), n
        assert torch.equal(lw.router_ED, live.router_ED)


def test_listed_names_as_save_pretrained_writes(saved, model):
    keys = ExpertCheckpoint(saved).weights.key_file
    assert any(".experts.0.gate_proj.weight" in k for k in keys)
    with ExpertCheckpoint(saved) as ckpt:
        assert ckpt.layers == [0, 1] and ckpt.num_experts == 4 and ckpt.hidden_size == 32
        assert ckpt.expert_ffn == 16 and ckpt.top_k == 2
        _assert_same(list(ckpt.iter_layers()), model)


def test_fused_names_give_identical_weights(model, tmp_path):
    d = _write_fused(model, tmp_path / "fused")
    _assert_same(list(iter_expert_layers(d)), model)
    assert ExpertCheckpoint(d).expert_ffn == 16


def test_mixtral_w1_w3_w2(tmp_path):
    m = _tiny("mixtral")
    m.save_pretrained(tmp_path / "mx")
    keys = ExpertCheckpoint(tmp_path / "mx").weights.key_file
    assert any("block_sparse_moe.experts.0.w1.weight" in k for k in keys)
    _assert_same(list(iter_expert_layers(tmp_path / "mx")), m)


def test_sharded_index(model, saved, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(saved / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    d = tmp_path / "sharded"
    d.mkdir()
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(saved / "config.json", d / "config.json")
    _assert_same(list(iter_expert_layers(d)), model)
    # one shard gone -> named in the error
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing.*model-00002-of-00002"):
        ExpertCheckpoint(d)


def test_float32_read_is_hidden_last_contiguous(saved, model, tmp_path):
    lw = ExpertCheckpoint(saved).read_layer(0, dtype=torch.float64)
    assert all(w.is_contiguous() and w.dtype == torch.float64 for w in lw.projections().values())
    ref = weights_of_block(find_moe_blocks(model)[0])
    assert torch.equal(lw.down_EDF.float(), ref.down_EDF)
    fused = ExpertCheckpoint(_write_fused(model, tmp_path / "f")).read_layer(0, dtype=torch.float64)
    assert fused.projections()["down"].is_contiguous() and torch.equal(fused.down_EDF.float(), ref.down_EDF)


def test_bf16_on_disk_and_dtype(model, tmp_path):
    d = _write_fused(model, tmp_path / "bf16", torch.bfloat16)
    lw = ExpertCheckpoint(d).read_layer(1)
    assert lw.gate_EFD.dtype == torch.bfloat16
    lw32 = ExpertCheckpoint(d).read_layer(1, dtype=torch.float32)
    assert lw32.gate_EFD.dtype == torch.float32
    ref = weights_of_block(find_moe_blocks(model)[1])
    assert torch.allclose(lw32.down_EDF, ref.down_EDF, rtol=1e-2, atol=1e-3)


def test_bad_inputs(saved, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ExpertCheckpoint(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        ExpertCheckpoint(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        ExpertCheckpoint(empty)
    shutil.copy(saved / "config.json", empty / "config.json")
    with pytest.raises(UserError, match="no model.safetensors"):
        ExpertCheckpoint(empty)
    # truncated file
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    shutil.copy(saved / "config.json", trunc / "config.json")
    data = (saved / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt; re-download it"):
        ExpertCheckpoint(trunc)
    with pytest.raises(UserError, match=r"layers \[7\]"):
        list(ExpertCheckpoint(saved).iter_layers([7]))


def test_no_moe_layers_names_what_was_found(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match=r"no MoE layers found.*mlp\.gate_proj\.weight") as e:
        ExpertCheckpoint(tmp_path / "llama")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("style", ["qwen3_moe", "olmoe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_model_tensors_read_saved_experts_under_fused_names(style, tmp_path):
    """save_pretrained's per-expert names (Mixtral's block_sparse_moe.experts.<i>.w1 too) read back under the
    model's own names; a part of a fused tensor is that part of the whole, across the gate/up seam."""
    from sdmoe.moe.checkpoint import ModelTensors, SafetensorsWeights

    model = _tiny(style)
    model.save_pretrained(tmp_path)
    tensors = ModelTensors(SafetensorsWeights(tmp_path), model.config.model_type)
    params = dict(model.named_parameters())
    assert tensors.names() >= set(params)
    for name, p in params.items():
        assert tensors.shape(name) == tuple(p.shape), name
        assert torch.equal(tensors.get_part(name, (0,) * p.dim(), tuple(p.shape)), p.detach()), name
    gate_up = next(n for n in params if n.endswith("experts.gate_up_proj"))
    whole = params[gate_up].detach()  # (E, 2F, D): rows 10..21 cross gate (F=16) into up
    assert torch.equal(tensors.get_part(gate_up, (1, 10, 3), (2, 12, 20)), whole[1:3, 10:22, 3:23])
    assert tensors.get_part(gate_up, (4, 0, 0), (0, 32, 32)).shape == (0, 32, 32)  # an empty shard


def test_model_tensors_refuse_incomplete_or_mismatched_experts(saved, tmp_path):
    from safetensors.torch import load_file

    from sdmoe.moe.checkpoint import ModelTensors, SafetensorsWeights

    sd = load_file(str(saved / "model.safetensors"))
    gone = {k: v for k, v in sd.items() if ".experts.2." not in k}
    (tmp_path / "a").mkdir()
    save_file(gone, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(UserError, match="incomplete"):
        ModelTensors(SafetensorsWeights(tmp_path / "a"), "qwen3_moe")
    key = "model.layers.0.mlp.experts.1.up_proj.weight"
    (tmp_path / "b").mkdir()
    save_file({**sd, key: sd[key][:-1].contiguous()}, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(UserError, match="differ in shape"):
        ModelTensors(SafetensorsWeights(tmp_path / "b"), "qwen3_moe").shape("model.layers.0.mlp.experts.gate_up_proj")


def test_expert_tensors_no_layout_reads_are_refused_in_one_line(saved, tmp_path):
    # fused names whose shapes pair in no orientation: named, with their shapes, not a vague "no layers"
    d = tmp_path / "odd"
    d.mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 30, 8),
               "model.layers.0.mlp.experts.down_proj": torch.zeros(4, 8, 7)}, str(d / "model.safetensors"))
    shutil.copy(saved / "config.json", d / "config.json")
    with pytest.raises(UserError, match=r"expert tensors of model.layers.0.mlp \(experts.down_proj \[4, 8, 7\]") as e:
        ExpertCheckpoint(d)
    assert "\n" not in str(e.value)
    # per-expert names with an expert missing: the block and the ids
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(str(saved / "model.safetensors")).items() if ".experts.2.up_proj" not in k}
    (tmp_path / "cut").mkdir()
    save_file(sd, str(tmp_path / "cut" / "model.safetensors"))
    shutil.copy(saved / "config.json", tmp_path / "cut" / "config.json")
    with pytest.raises(UserError, match=r"model.layers.0.mlp in .*: experts gate_proj/up_proj/down_proj are incomplete"):
        ExpertCheckpoint(tmp_path / "cut")
