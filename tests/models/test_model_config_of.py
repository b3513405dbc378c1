"""`model_config_of`: a checkpoint of any family sdmoe finds experts in gives the run's model section, its
experts, top-k and widths read off the model built on the meta device, whatever the config calls them."""

from __future__ import annotations

import pytest

from sdmoe.errors import UserError
from sdmoe.models import ModelConfig, build_model
from sdmoe.models.pretrained import model_config_of
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.families import build_tiny


def _saved(model, path, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# each names its experts, top-k and expert width its own way: num_local_experts / moe_topk (HunYuan),
# num_local_experts + intermediate_size (JetMoE, Llama 4), ffn_config.moe_num_experts / moe_top_k (DBRX),
# moe_num_experts / moe_k (ERNIE 4.5), n_routed_experts (DeepSeek-V3)
@pytest.mark.parametrize("model_type", ["hunyuan_v1_moe", "jetmoe", "llama4_text", "dbrx", "ernie4_5_moe",
                                        "deepseek_v3"])
def test_model_section_is_read_off_the_model(model_type, tmp_path, tiny_dataset):
    tok = tiny_dataset.tokenizer
    model = build_tiny(model_type, vocab_size=len(tok), num_experts_per_tok=3) if model_type != "dbrx" else \
        build_tiny(model_type, vocab_size=len(tok))
    block = find_moe_blocks(model)[0]
    cfg = model_config_of(_saved(model, tmp_path, tok))
    assert cfg.style == model_type
    assert (cfg.hidden_size, cfg.num_experts, cfg.expert_ffn) == (64, 4, block.expert_ffn)
    assert cfg.top_k == (2 if model_type == "dbrx" else 3)  # DBRX's top-k sits in its ffn_config
    assert cfg.num_layers == 2 and cfg.num_heads == 4


def test_the_six_built_styles_read_as_before(tmp_path, tiny_dataset):
    tok = tiny_dataset.tokenizer
    want = ModelConfig(style="qwen2_moe", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, num_experts=4,
                       top_k=2, expert_ffn=16, shared_expert_ffn=24, max_seq_len=64, aux_loss_coef=0.02, init_std=0.03)
    got = model_config_of(_saved(build_model(want, len(tok)), tmp_path, tok))
    assert got == want


def test_refused_and_dense_checkpoints_say_why_in_one_line(tmp_path, tiny_dataset):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_dataset.tokenizer
    with pytest.raises(UserError, match="are not a gated MLP") as e:  # experts with up and down only
        model_config_of(_saved(build_tiny("nemotron_h", vocab_size=len(tok)), tmp_path / "nemotron", tok))
    assert "\n" not in str(e.value)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=32, head_dim=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UserError, match="is a dense qwen3 model.*sdmoe upcycle"):
        model_config_of(_saved(dense, tmp_path / "dense", tok))


def test_a_family_not_tested_here_is_refused(tmp_path, tiny_dataset, monkeypatch):
    import sdmoe.models.pretrained as pretrained

    tok = tiny_dataset.tokenizer
    monkeypatch.setattr(pretrained, "STYLE_CHOICES", ("qwen3_moe",))  # as a newer transformers' new family would be
    with pytest.raises(UserError, match="'jetmoe' MoE, a family this sdmoe has not been tested with"):
        model_config_of(_saved(build_tiny("jetmoe", vocab_size=len(tok)), tmp_path, tok))


def test_a_continued_family_is_no_style_for_a_new_model():
    from sdmoe.models.config import validate

    with pytest.raises(UserError, match="model.style=jetmoe is a family sdmoe continues from a checkpoint"):
        validate(ModelConfig(style="jetmoe"), 512)
    with pytest.raises(UserError, match="unknown model style 'gpt9'; model.style must be one of qwen2_moe"):
        validate(ModelConfig(style="gpt9"), 512)
