"""FP8 block-quantised and MXFP4 checkpoints, read dequantised: tensor by tensor (`analyze --weights-only`,
`ModelTensors`), loaded whole (`train --init`), refused where weights are copied as they are (upcycle).

The checkpoints are tiny models quantised here (tests/moe/quant_helpers.py), checked against the same tensors
dequantised by the formats' definitions and saved in float32."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from sdmoe.analysis.run import analyze_path
from sdmoe.cli import main
from sdmoe.errors import UserError
from sdmoe.models import ModelConfig, build_model
from sdmoe.models.pretrained import load_init_model, load_pretrained_model
from sdmoe.models.upcycle import upcycle
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.checkpoint import ExpertCheckpoint, ModelTensors, SafetensorsWeights, weights_of_block
from sdmoe.moe.quantized import dequantize_fp8, dequantize_mxfp4

from .quant_helpers import (
    dequantize_fp8_by_loop,
    dequantize_mxfp4_by_loop,
    quantize_fp8,
    quantize_mxfp4,
    save_dequantised,
    write_fp8,
    write_mxfp4,
)

BLOCK = (32, 32)  # d=48 and F=40 are not multiples of it: every weight has partial edge blocks


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, tiny_dataset):
    """A qwen3_moe saved by save_pretrained (per-expert names, as the Qwen3 FP8 releases), FP8-quantised into two
    shards with an index, and the same tensors dequantised and saved in float32."""
    root, tok = tmp_path_factory.mktemp("fp8"), tiny_dataset.tokenizer
    cfg = ModelConfig(style="qwen3_moe", hidden_size=48, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=40)
    model = build_model(cfg, len(tok), seed=3, eos_token_id=tok.eos_token_id)
    model.save_pretrained(root / "f32")
    tok.save_pretrained(root / "f32")
    meant = write_fp8(root / "f32", root / "q", BLOCK, shards=2)
    save_dequantised(meant, root / "f32", root / "deq")
    return SimpleNamespace(model=model, q=root / "q", deq=root / "deq", meant=meant, root=root)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory, tiny_dataset):
    """A gpt_oss (D == F, as gpt-oss' 2880) with its experts in MXFP4, and the same dequantised in float32."""
    root, tok = tmp_path_factory.mktemp("mxfp4"), tiny_dataset.tokenizer
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=len(tok), hidden_size=64, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                               num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2,
                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "f32")
    tok.save_pretrained(root / "f32")
    meant = write_mxfp4(root / "f32", root / "q")
    save_dequantised(meant, root / "f32", root / "deq")
    return SimpleNamespace(model=model, q=root / "q", deq=root / "deq", meant=meant, root=root)


# -- one tensor: transformers' dequantisation against the definition, and against what was quantised -------------
@pytest.mark.parametrize("shape, block", [((130, 200), (128, 128)), ((3, 72, 40), (32, 16)), ((256, 128), (128, 128))])
def test_fp8_dequantisation_is_the_definition_within_fp8_rounding(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    w[..., 0, 0] = 0.5  # one large value: the rest of its block falls into e4m3's subnormals
    q, s = quantize_fp8(w, block)
    got = dequantize_fp8(q, s, block)
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert torch.equal(got, dequantize_fp8_by_loop(q, s, block))
    # e4m3: 3 mantissa bits (relative half-step 2**-4), subnormal step 2**-9 of the block's scale
    scale = torch.repeat_interleave(torch.repeat_interleave(s, block[0], -2)[..., : shape[-2], :], block[1], -1)
    bound = 2**-4 * w.abs() + 2**-10 * scale[..., : shape[-1]] * 1.001
    assert ((got - w).abs() <= bound).all()
    assert (got - w).abs().max() > 0  # it did round: the check above is not vacuous


def test_fp8_scales_as_ue8m0_bytes_are_powers_of_two():
    q = torch.full((4, 4), 2.0).to(torch.float8_e4m3fn)
    got = dequantize_fp8(q, torch.tensor([[130]], dtype=torch.uint8), (128, 128))  # 2**(130 - 127) = 8
    assert torch.equal(got, torch.full((4, 4), 16.0))


def test_mxfp4_dequantisation_is_the_definition_within_fp4_rounding():
    w = torch.randn(3, 96, 40, generator=torch.Generator().manual_seed(1)) * 0.02  # (E, C, R) as gpt-oss holds it
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 40, 3, 16) and scales.shape == (3, 40, 3)
    got = dequantize_mxfp4(blocks, scales)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(got.float(), dequantize_mxfp4_by_loop(blocks, scales))  # bf16 holds e2m1 * 2**e exactly
    # per block of 32: step 2**e below 4 * 2**e... the widest gap (4 to 6) and the clamp at 6 err by at most 2 * 2**e
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)
    assert ((got.float() - w).abs() <= 2 * step).all()
    exact = dequantize_mxfp4_by_loop(blocks, scales)  # values on the grid come back unchanged
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(exact)).float(), exact)


# -- the reader: the model's names, dequantised when read --------------------------------------------------------
def test_fp8_checkpoint_reads_as_its_dequantised_tensors(fp8):
    w = SafetensorsWeights(fp8.q)
    assert not any(k.endswith("_scale_inv") for k in w.keys()) and set(w.keys()) == set(fp8.meant)
    assert any(k.endswith("_scale_inv") for k in w.key_file)  # what the files hold is unchanged
    for key, want in fp8.meant.items():
        assert w.shape(key) == tuple(want.shape) and torch.equal(w.get(key), want), key
    key = "model.layers.1.mlp.experts.2.gate_proj.weight"  # 40 x 48 in 32 x 32 blocks
    assert w.stored(key).get_dtype() == "F8_E4M3"
    assert torch.equal(w.get_part(key, (7, 33), (30, 10)), fp8.meant[key][7:37, 33:43])  # across a block edge


def test_mxfp4_checkpoint_reads_as_its_dequantised_tensors(mxfp4):
    w = SafetensorsWeights(mxfp4.q)
    assert set(w.keys()) == set(mxfp4.meant)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert w.shape(key) == (4, 64, 128) == tuple(mxfp4.model.state_dict()[key].shape)
    for name, want in mxfp4.meant.items():
        assert torch.equal(w.get(name).float(), want.float()), name
    part = w.get_part(key, (1, 20, 3), (2, 30, 70))  # columns 20..50 cross a block of 32
    assert torch.equal(part.float(), mxfp4.meant[key][1:3, 20:50, 3:73])


def test_fused_part_reads_of_fp8_experts_for_fsdp(fp8):
    """`from_pretrained_sharded` reads a rank's experts through ModelTensors' merges of per-expert names."""
    tensors = ModelTensors(SafetensorsWeights(fp8.q), "qwen3_moe")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert tensors.shape(name) == (4, 80, 48)
    want = torch.stack([torch.cat([fp8.meant[f"model.layers.0.mlp.experts.{i}.{p}.weight"] for p in ("gate_proj", "up_proj")])
                        for i in range(4)])
    assert torch.equal(tensors.get_part(name, (1, 0, 0), (2, 80, 48)), want[1:3])


def test_gpt_oss_experts_read_transposed_and_interleaved(mxfp4):
    """gpt-oss stores gate_up (E, D, 2F) with gate and up interleaved, down (E, F, D), and D == F: the reader
    takes that from the model type, not the (ambiguous) shapes; unquantised and dequantised alike."""
    dequantised = AutoModelForCausalLM.from_pretrained(mxfp4.deq)
    for path, model in ((mxfp4.root / "f32", mxfp4.model), (mxfp4.q, dequantised)):
        with ExpertCheckpoint(path) as ckpt:
            for lw, block in zip(ckpt.iter_layers(dtype=torch.float32), find_moe_blocks(model), strict=True):
                live = weights_of_block(block).projections()
                for name, w in lw.projections().items():
                    assert w.shape == live[name].shape and torch.equal(w, live[name]), (path, name)


# -- analyze --weights-only -------------------------------------------------------------------------------------
def _findings(path) -> list[dict]:
    result = analyze_path(path, weights_only=True, rank=4, write=False, progress=False)
    return [r.to_dict() for r in result.parameters]


@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_weights_only_findings_equal_the_dequantised_float32_checkpoints(which, request):
    ckpt = request.getfixturevalue(which)
    got, want = _findings(ckpt.q), _findings(ckpt.deq)
    assert len(got) == len(want) == 6  # 2 layers x 3 projections
    assert _close(got, want)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_weights_only_cli_on_an_fp8_checkpoint(fp8, tmp_path, capsys):
    assert main(["analyze", str(fp8.q), "--weights-only", "--rank", "4", "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "analysis.json").read_text())["meta"]
    assert meta["num_experts"] == 4 and meta["hidden_size"] == 48 and meta["expert_ffn"] == 40


# -- train --init and every whole-model load ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fp8", "mxfp4"])
def test_whole_model_loads_as_the_dequantised_checkpoint(which, request, tmp_path):
    ckpt = request.getfixturevalue(which)
    model = load_pretrained_model(ckpt.q)
    want = AutoModelForCausalLM.from_pretrained(ckpt.deq).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "resaved")  # saved plain: a later load does not expect scales
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_train_init_continues_an_fp8_checkpoint(fp8, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--quiet", "--steps", "2", "--set", "loop.eval_every=2",
                 "--set", "loop.monitor_every=0", "--set", "loop.threads=1", "--init", str(fp8.q),
                 "--method", "baseline", "--out", str(out)]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "qwen3_moe"
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    start = fp8.meant["model.layers.0.mlp.experts.1.up_proj.weight"]
    w = find_moe_blocks(trained)[0].up_EFD()[1]
    # trained, from those weights (measured: 0.14 of their norm after 2 steps; an independent init is ~1.4)
    assert not torch.equal(w, start) and (w - start).norm() < 0.5 * start.norm()


def test_init_model_of_an_mxfp4_gpt_oss_trains_from_the_dequantised_weights(mxfp4):
    """What `train --init` loads (whether it accepts the family is `model_config_of`'s call): float32, the
    dequantised weights, a step's gradient reaching the experts."""
    model = load_init_model(mxfp4.q)
    want = AutoModelForCausalLM.from_pretrained(mxfp4.deq).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and find_moe_blocks(model)[0].experts.gate_up_proj.grad.abs().sum() > 0


# -- upcycle -----------------------------------------------------------------------------------------------------
def test_upcycle_refuses_a_quantised_dense_checkpoint_in_one_line(tmp_path, tiny_dataset):
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tiny_dataset.tokenizer), hidden_size=32, intermediate_size=48,
                               head_dim=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    tiny_dataset.tokenizer.save_pretrained(tmp_path / "dense")
    meant = write_fp8(tmp_path / "dense", tmp_path / "fp8", (16, 16))
    with pytest.raises(UserError) as e:
        upcycle(tmp_path / "fp8", tmp_path / "moe", experts=4, top_k=2, progress=False)
    msg = str(e.value)
    assert "fp8 16x16 blocks" in msg and "quantization_config" in msg and "load_pretrained_model(PATH" in msg
    assert not (tmp_path / "moe").exists()
    # the fix it names works
    load_pretrained_model(tmp_path / "fp8", torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_dataset.tokenizer.save_pretrained(tmp_path / "bf16")
    upcycle(tmp_path / "bf16", tmp_path / "moe", experts=4, top_k=2, progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    want = meant["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float()
    assert torch.equal(find_moe_blocks(moe)[1].down_EDF()[2].float(), want)  # every expert a copy of the FFN


# -- bad input: one line naming the tensor or field, and the fix ---------------------------------------------------
def _copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            edit_tensors(tensors)
            save_file(tensors, str(f), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


SCALE = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"


def _one_line(path, *needles):
    with pytest.raises(UserError) as e:
        ExpertCheckpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_missing_scale_tensor_is_named(fp8, tmp_path):
    path = _copy(fp8.q, tmp_path / "c", lambda t: t.pop(SCALE, None))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][SCALE]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line(path, SCALE, "download every shard")
    with pytest.raises(UserError, match="has no scale tensor"):  # and the whole-model load says the same
        load_pretrained_model(path)


def test_scale_of_the_wrong_shape_is_named(fp8, tmp_path):
    def edit(t):
        if SCALE in t:
            t[SCALE] = torch.ones(1, 1)  # 48 x 40 in 32 x 32 blocks needs 2 x 2
    _one_line(_copy(fp8.q, tmp_path / "c", edit), SCALE, "[1, 1]", "[2, 2]", "download every shard")


def test_unknown_quant_method_names_the_field(fp8, tmp_path):
    path = _copy(fp8.q, tmp_path / "c", edit_config=lambda c: c["quantization_config"].update(quant_method="awq"))
    _one_line(path, "quant_method 'awq'", "quantization_config", "bf16 release")


def test_bad_block_size_names_the_field(fp8, tmp_path):
    path = _copy(fp8.q, tmp_path / "c", edit_config=lambda c: c["quantization_config"].update(weight_block_size=128))
    _one_line(path, "weight_block_size 128", "[128, 128]")


def test_quantised_tensors_without_quantization_config(fp8, tmp_path):
    path = _copy(fp8.q, tmp_path / "c", edit_config=lambda c: c.pop("quantization_config"))
    _one_line(path, "_scale_inv", "names no quantization_config", "restore config.json")


def test_mxfp4_scales_missing_or_misshapen(mxfp4, tmp_path):
    key = "model.layers.0.mlp.experts.down_proj_scales"
    _one_line(_copy(mxfp4.q, tmp_path / "a", lambda t: t.pop(key)), key, "has no scale tensor")
    _one_line(_copy(mxfp4.q, tmp_path / "b", lambda t: t.update({key: t[key][:, :, :1].contiguous()})), key,
              "[4, 64, 1]", "[4, 64, 2]")


def test_nan_in_the_stored_bytes_is_named(fp8, mxfp4, tmp_path):
    key = "model.layers.0.mlp.experts.1.gate_proj.weight"

    def nan_fp8(t):
        if key in t:
            t[key].view(torch.uint8)[3, 5] = 0x7F  # e4m3fn's NaN
    w = SafetensorsWeights(_copy(fp8.q, tmp_path / "a", nan_fp8))
    with pytest.raises(UserError, match=f"tensor {key} in .* holds NaN or infinite values"):
        w.get(key)
    scales = "model.layers.1.mlp.experts.down_proj_scales"
    w = SafetensorsWeights(_copy(mxfp4.q, tmp_path / "b", lambda t: t[scales].view(-1)[:1].fill_(0xFF)))  # E8M0 NaN
    with pytest.raises(UserError, match="down_proj_blocks in .* holds NaN"):
        analyze_path(w.path, weights_only=True, rank=4, write=False, progress=False)
