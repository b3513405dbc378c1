"""`ModelConfig`: a small MoE model in the paper's terms (d, f, E, top-k), and its checks.

Each field's type and range are declared next to it (`sdmoe.config_fields`);
`validate` checks them and the rules between fields. Imports no torch, so a run's
configuration loads and is checked before any weight exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sdmoe.config_fields import check_tree, setting
from sdmoe.errors import UserError

# Architectures whose MoE blocks we know and test; the first two are the
# defaults of `compare` (softmax router + gated shared expert; sigmoid router
# with score-correction bias + fine-grained shared experts).
Style = Literal["qwen2_moe", "deepseek_v3", "qwen3_moe", "deepseek_v2", "olmoe", "mixtral"]
ExpertsImplementation = Literal["auto", "eager", "batched_mm", "grouped_mm"]
STYLES = get_args(Style)
EXPERTS_IMPLEMENTATIONS = get_args(ExpertsImplementation)


@dataclass
class ModelConfig:
    style: Style = setting("qwen3_moe", label="model style")
    hidden_size: int = setting(128, ge=1)  # d
    num_layers: int = setting(4, ge=1)
    num_heads: int = setting(4, ge=1)
    num_kv_heads: int = setting(0, ge=0, note="0 = num_heads")
    num_experts: int = setting(8, ge=1)  # E routed experts
    top_k: int = setting(2, ge=1)
    expert_ffn: int = setting(128, ge=1)  # f, each routed expert's intermediate width
    # only styles with shared experts use it
    shared_expert_ffn: int = setting(0, ge=0, note="0 = expert_ffn")
    max_seq_len: int = setting(512, ge=1)
    aux_loss_coef: float = setting(0.01, ge=0)  # the host model's own load-balancing loss
    init_std: float = setting(0.02, gt=0)
    tie_embeddings: bool = False
    # transformers' expert kernel: "eager" (a loop over the experts a batch hits), "batched_mm" or
    # "grouped_mm" (one grouped GEMM); "auto" = grouped_mm on CUDA, eager on the CPU (the reference
    # kernel of every recorded result; sdmoe.device.experts_kernel). SD-MoE runs unchanged on each.
    experts_implementation: ExpertsImplementation = setting("auto", label="model.experts_implementation")


def validate(cfg: ModelConfig, vocab_size: int) -> None:
    """Reject configs that cannot build, with the fix in the message."""
    check_tree(cfg, "model")
    if cfg.top_k > cfg.num_experts:
        raise UserError(
            f"model.top_k={cfg.top_k} exceeds model.num_experts={cfg.num_experts}; "
            "set model.top_k <= model.num_experts"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise UserError(
            f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}; "
            "pick a head count that divides the hidden size"
        )
    kv = cfg.num_kv_heads or cfg.num_heads
    if cfg.num_heads % kv:
        raise UserError(f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads={kv}")
    if (cfg.hidden_size // cfg.num_heads) % 2:
        raise UserError(
            f"head size {cfg.hidden_size // cfg.num_heads} is odd; rotary embeddings need an even head size"
        )
    if cfg.style.startswith("deepseek") and cfg.num_experts % 2:
        raise UserError("deepseek styles route within expert groups; use an even model.num_experts")
    if vocab_size < 16:
        raise UserError(f"vocab size {vocab_size} is too small for a language model; use at least 256")
