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

# Architectures `build_model` builds (a new model's `style`); the first two are the defaults of `compare`
# (softmax router + gated shared expert; sigmoid router with score-correction bias + fine-grained shared experts).
BuildStyle = Literal["qwen2_moe", "deepseek_v3", "qwen3_moe", "deepseek_v2", "olmoe", "mixtral"]
# The other transformers MoE families `train --init` continues (a checkpoint's `model_type` is its style):
# those docs/families.md shows taken through attach, training, export, reload, analysis and --init.
# tests/moe/test_families.py checks this list against the families discovered in the installed transformers.
CONTINUED_STYLES = (
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "dbrx", "deepseek_v32",
    "deepseek_v4", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling2_loop_text", "inkling2_text", "jamba",
    "jetmoe", "kimi_linear", "kolibri1", "kolibri1_1", "laguna", "lara_mini", "lfm2_moe", "llama4_text", "mellum",
    "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl_text", "phimoe", "qwen3_5_moe_text",
    "qwen3_next", "qwen4_exp_text", "solar_open",
)
Style = Literal[BuildStyle, Literal[CONTINUED_STYLES]]
ExpertsImplementation = Literal["auto", "eager", "batched_mm", "grouped_mm"]
STYLES = get_args(BuildStyle)  # what a new model may be
STYLE_CHOICES = get_args(Style)  # what a run's model may be: a new model's, or a continued checkpoint's
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
    if cfg.style not in STYLES:
        raise UserError(f"model.style={cfg.style} is a family sdmoe continues from a checkpoint, not one it builds; "
                        f"continue one with `sdmoe train --init PATH`, or build {', '.join(STYLES)}")
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
