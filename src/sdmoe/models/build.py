"""Small MoE language models built from transformers' own classes.

One `ModelConfig` (`sdmoe.models.config`) describes a model in the terms the
paper uses (d, f, E, top-k); `to_hf_config` translates it into each architecture's own config so
the model that trains is exactly the transformers class a user already runs.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from sdmoe.device import experts_kernel
from sdmoe.models.config import EXPERTS_IMPLEMENTATIONS, STYLES, ModelConfig, validate

__all__ = ["EXPERTS_IMPLEMENTATIONS", "STYLES", "ModelConfig", "build_model", "count_parameters", "model_hf_config",
           "to_hf_config", "unigram_baseline_nats", "validate"]


def to_hf_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    validate(cfg, vocab_size)
    d, heads = cfg.hidden_size, cfg.num_heads
    kv = cfg.num_kv_heads or heads
    shared = cfg.shared_expert_ffn or cfg.expert_ffn
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.aux_loss_coef,
        # Router logits are part of every forward so the aux loss and the
        # load statistics see them (the host models gate this on a flag).
        output_router_logits=True,
        use_cache=False,
    )
    s = cfg.style
    if s == "qwen2_moe":
        extra = dict(
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.expert_ffn,
            shared_expert_intermediate_size=shared,
            intermediate_size=shared,
            norm_topk_prob=True,
        )
    elif s == "qwen3_moe":
        extra = dict(
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.expert_ffn,
            intermediate_size=cfg.expert_ffn,
            head_dim=d // heads,
            norm_topk_prob=True,
        )
    elif s == "olmoe":
        extra = dict(num_experts=cfg.num_experts, intermediate_size=cfg.expert_ffn, norm_topk_prob=True)
    elif s == "mixtral":
        extra = dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_ffn, head_dim=d // heads)
    else:  # deepseek_v2 / deepseek_v3: multi-head latent attention, every layer MoE
        head = d // heads
        n_shared = max(1, round(shared / cfg.expert_ffn))
        extra = dict(
            n_routed_experts=cfg.num_experts,
            n_shared_experts=n_shared,
            moe_intermediate_size=cfg.expert_ffn,
            intermediate_size=cfg.expert_ffn * (n_shared + cfg.top_k),
            first_k_dense_replace=0,
            kv_lora_rank=max(16, d // 4),
            q_lora_rank=None,
            qk_rope_head_dim=head // 2,
            qk_nope_head_dim=head // 2,
            v_head_dim=head,
            head_dim=head // 2,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
        )
        if s == "deepseek_v2":
            extra.update(topk_method="greedy")
        else:
            extra.update(rope_interleave=True)
    return AutoConfig.for_model(s, **common, **extra)


def model_hf_config(cfg: ModelConfig, vocab_size: int, eos_token_id: int = 0,
                    device: torch.device | str = "cpu") -> PretrainedConfig:
    """The transformers config `build_model` builds from (token ids and the device's expert kernel set)."""
    hf_config = to_hf_config(cfg, vocab_size)
    hf_config.bos_token_id = hf_config.eos_token_id = hf_config.pad_token_id = eos_token_id
    hf_config._experts_implementation = experts_kernel(cfg.experts_implementation, torch.device(device))
    return hf_config


def build_model(cfg: ModelConfig, vocab_size: int, seed: int = 0, eos_token_id: int = 0,
                device: torch.device | str = "cpu") -> PreTrainedModel:
    """A freshly initialised transformers MoE causal LM (float32, train mode) on `device`.

    The weights are drawn on the CPU whatever the device (the same seed gives the same
    model everywhere), then moved; the expert kernel is the device's (`experts_kernel`).
    `sdmoe.train.fsdp.build_sharded` draws the same weights shard by shard."""
    device = torch.device(device)
    hf_config = model_hf_config(cfg, vocab_size, eos_token_id, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
    if cfg.style.startswith("deepseek"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for name, p in model.named_parameters():
                if is_zero_init_router(name):
                    torch.nn.init.normal_(p, std=cfg.init_std)
    model.train()
    return model.to(device)


def is_zero_init_router(name: str) -> bool:
    """A DeepSeek router weight, which transformers leaves at zero init (every routing decision a tie):
    `build_model` gives it the usual normal init."""
    return name.endswith("mlp.gate.weight")


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def unigram_baseline_nats(vocab_size: int) -> float:
    """Entropy of a uniform guess, the loss of an untrained model."""
    return math.log(vocab_size)
