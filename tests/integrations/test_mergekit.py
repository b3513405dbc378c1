"""mergekit (arcee-ai/mergekit) and `sdmoe upcycle`: mergekit reads our upcycled MoE checkpoints (its
architecture detection keys on config.json's `architectures`, which upcycle used not to write: mergekit-yaml
stopped with `TypeError: object of type 'NoneType' has no len()`), mergekit-moe's copy-upcycle of the same
dense model holds our tensors (routers aside), and `--router hidden` gives mergekit's `gate_mode: hidden`
rows (it runs the model in bfloat16, we in float32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit.merge", reason='needs the mergekit extra: pip install "sdmoe[mergekit]"')

from mergekit.architecture import arch_info_for_config  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sdmoe.models.upcycle import upcycle  # noqa: E402

VOCAB = 512
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
PROMPTS = [["the quick brown fox", "jumps over the lazy dog"], ["a small model learns small things"],
           ["the dog; the dog"], ["over and over"]]


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tiny_dataset):
    """A tiny dense mistral and qwen3, with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("dense")
    for model_type in ("mistral", "qwen3"):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SIZES)).save_pretrained(root / model_type)
        tiny_dataset.tokenizer.save_pretrained(root / model_type)
    return root


def _merge(config: dict, out):
    run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(device="cpu", quiet=True))


def _state(path):
    return AutoModelForCausalLM.from_pretrained(path).eval().state_dict()


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_mergekit_reads_and_merges_our_upcycled_model(tmp_path, dense, model_type):
    for seed in (0, 1):  # the same experts, routers of their own
        upcycle(dense / model_type, tmp_path / f"moe{seed}", experts=4, top_k=2, seed=seed, progress=False)
    config = AutoConfig.from_pretrained(tmp_path / "moe0")
    assert arch_info_for_config(config) is not None  # mergekit knows the architecture from config.json
    _merge({"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(tmp_path / "moe0"), "layer_range": [0, 2]}]}]}, tmp_path / "pass")
    ours, passed = _state(tmp_path / "moe0"), _state(tmp_path / "pass")
    assert ours.keys() == passed.keys() and all(torch.equal(ours[k], passed[k]) for k in ours)
    _merge({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tmp_path / "moe0"), "parameters": {"weight": 0.5}},
        {"model": str(tmp_path / "moe1"), "parameters": {"weight": 0.5}}]}, tmp_path / "linear")
    other, linear = _state(tmp_path / "moe1"), _state(tmp_path / "linear")
    for k in ours:
        torch.testing.assert_close(linear[k], (ours[k] + other[k]) / 2, rtol=0, atol=1e-6)
    assert not torch.equal(linear["model.layers.0.mlp.gate.weight"], ours["model.layers.0.mlp.gate.weight"])


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_mergekit_moe_copies_the_same_tensors(tmp_path, dense, model_type):
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    src = str(dense / model_type)
    config = MoEMergeConfig.model_validate({"base_model": src, "gate_mode": "random", "dtype": "float32",
                                            "experts_per_token": 2, "experts": [{"source_model": src}] * 4})
    build(config, str(tmp_path / "mk"), MergeOptions(device="cpu", quiet=True), device="cpu", allow_all_same=True)
    upcycle(src, tmp_path / "ours", experts=4, top_k=2, progress=False)
    theirs, ours = _state(tmp_path / "mk"), _state(tmp_path / "ours")
    assert theirs.keys() == ours.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert differ == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]  # the routers, random in both


def test_hidden_routers_are_mergekits_gate_params(tmp_path, dense):
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe.router import get_gate_params

    src = dense / "mistral"
    files = []
    for i, lines in enumerate(PROMPTS):
        files.append(tmp_path / f"e{i}.txt")
        files[-1].write_text("\n".join(lines))
    upcycle(src, tmp_path / "ours", experts=4, top_k=2, router="hidden", prompts=files, progress=False)
    ref = ModelReference.parse(str(src))
    tok = AutoTokenizer.from_pretrained(src)
    tok.padding_side, tok.pad_token = "left", tok.bos_token or tok.eos_token  # as mergekit-moe's build sets them
    theirs = get_gate_params(ref, tok, [Expert(source_model=ref, positive_prompts=p) for p in PROMPTS], mode="hidden",
                             device="cpu")
    ours = _state(tmp_path / "ours")
    for layer in range(2):
        # unit rows; mergekit's model runs in bfloat16 (8 bits of mantissa), ours in float32
        torch.testing.assert_close(ours[f"model.layers.{layer}.mlp.gate.weight"], theirs[layer].float(), rtol=0,
                                   atol=1e-2)
