"""The causal-LM mixture-of-experts families of the installed transformers, each built tiny on the CPU.

    for model_type in moe_model_types():      # discovered, not listed: a new transformers is checked on install
        model = build_tiny(model_type)         # a few hundred thousand parameters, random weights
        find_moe_blocks(model)                 # found, or one line saying why not

Discovery walks transformers' own tables: every model type `AutoModelForCausalLM` maps
(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) whose default config declares experts (a positive integer
field, at any depth, whose name mentions "expert": `num_experts`, `num_local_experts`,
`n_routed_experts`, `moe_num_experts`, DBRX's `ffn_config.moe_num_experts`, ...). An alias (a
model type whose causal-LM class belongs to another config: `llama4` -> `llama4_text`, `param2moe` ->
`glm4_moe`) is left to the type that owns the class, so each modelling file is one family.

The tiny config shrinks, by name, every size field the default config has (hidden size, widths,
layers, heads, experts, ranks, vocabulary) and keeps the rest of the family's defaults; the few
families that need more (a layer pattern, a head rule of their own) have a line in `_EXTRA`.
"""

from __future__ import annotations

import functools
from typing import Any

from sdmoe.errors import UserError

TINY_VOCAB = 512
TINY_HIDDEN = 64
# A family whose tiny model would still hold more than this many parameters is not built (its config
# has a size field we do not shrink): a table run must not exhaust a small machine's memory.
MAX_TINY_PARAMETERS = 8_000_000

# Shrunk wherever the default config has the field (an attribute, its `attribute_map` aliases included).
_SIZES: dict[str, int] = {
    # model width and depth
    "hidden_size": TINY_HIDDEN, "d_model": TINY_HIDDEN, "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2,
    "max_position_embeddings": 256, "max_seq_len": 256,
    # dense and expert widths
    "intermediate_size": 64, "ffn_hidden_size": 64, "first_dense_intermediate_size": 64,
    "mlp_only_intermediate_size": 64, "shared_intermediate_size": 32, "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "shared_expert_intermediate_size": 32, "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "router_hidden_size": 16,
    # attention
    "num_attention_heads": 4, "n_heads": 4, "head_dim": 16, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
    "swa_head_dim": 16, "kv_channels": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16, "index_n_heads": 2, "index_num_heads": 2, "index_head_dim": 16, "index_topk": 16,
    # linear attention / state-space mixers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": 4, "linear_head_dim": 16, "ssm_state_size": 16, "mamba_num_heads": 8, "mamba_n_heads": 8,
    "mamba_head_dim": 16, "mamba_d_state": 16, "mamba_chunk_size": 16, "n_groups": 1, "chunk_size": 16,
    "o_lora_rank": 16, "hc_lowrank": 16,
    # experts and routing
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "moe_top_k": 2, "moe_topk": 2, "moe_k": 2, "n_group": 1, "topk_group": 1,
    "num_expert_group": 1, "zero_expert_num": 2,
}
# Leading dense layers: at most one, so one of the two tiny layers is an MoE layer.
_DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "num_dense_blocks")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# What a family needs beyond the shrinking above: its own rules between fields.
_EXTRA: dict[str, dict[str, Any]] = {
    "doge": {"is_moe": True},  # dense unless asked
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # no default pattern
    "zaya": {"num_experts_per_tok": 1},  # top-1 routing only
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},  # an attention layer among the two
    # its attention reads attn_config.rope_theta, which the default leaves out, and clamps q/k/v to clip_qkv
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "dots3_note_text": {"per_layer_config": {}, "head_dim": 16},  # per-layer heads of the full size; nope + rope
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},  # all linear attention by default
    # the default config leaves its indexer unset (it builds from no config of its own)
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4},
}


def _expert_fields(d: dict, prefix: str = "") -> list[str]:
    """Names of the positive integer fields of a config dict (nested ones too) that mention experts."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _expert_fields(v, f"{prefix}{k}.")
        elif "expert" in str(k) and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.append(f"{prefix}{k}")
    return out


def declares_experts(config) -> bool:
    """Whether a transformers config declares experts (a positive integer field mentioning them, at any depth)."""
    return bool(_expert_fields(config.to_dict()))


@functools.cache
def moe_model_types() -> tuple[str, ...]:
    """Every causal-LM model type of the installed transformers whose config declares experts, once per
    modelling class, sorted. Of the types that share a class (`llama4` and `llama4_text`, `glm4_moe` and
    `param2moe`) the one the class is written for is kept: its config is named after the class, and it is
    the text model itself, not a wrapper holding it as `text_config`."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging

    best: dict[str, tuple[tuple[bool, bool], str]] = {}  # causal-LM class -> (preference, model type)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # default configs warn about their own token ids; nothing for a user here
    try:
        configs = {t: _default_config(CONFIG_MAPPING, t) for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    finally:
        logging.set_verbosity(level)
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if (config := configs[model_type]) is None:
            continue
        if not declares_experts(config):
            continue
        stem = cls.removesuffix("ForCausalLM").lower()
        named = CONFIG_MAPPING_NAMES.get(model_type, "").lower() in (f"{stem}config", f"{stem}textconfig")
        rank = (named, getattr(config, "text_config", None) is None)
        if cls not in best or rank > best[cls][0]:
            best[cls] = (rank, model_type)
    return tuple(sorted(t for _, t in best.values()))


def _default_config(mapping, model_type: str):
    try:
        return mapping[model_type]()
    except Exception:  # noqa: BLE001 - a default config a family cannot build: no family here
        return None


def tiny_config(model_type: str, vocab_size: int = TINY_VOCAB, **overrides):
    """The family's default config with every size field shrunk (and `overrides` on top)."""
    from transformers import AutoConfig

    try:
        base = AutoConfig.for_model(model_type)
    except KeyError:
        raise UserError(f"transformers knows no model type {model_type!r}; pass one of "
                        f"{', '.join(moe_model_types())}") from None
    declared = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
    values: dict[str, Any] = {k: v for k, v in _SIZES.items() if k in declared}
    values.update({k: vocab_size for k in ("vocab_size", "unpadded_vocab_size") if k in declared})
    if "qk_rope_head_dim" in declared:  # multi-head latent attention: its rotary part is the head_dim
        values["head_dim"] = values["qk_rope_head_dim"]
    if "num_key_value_heads" in declared:
        # grouped-query attention stays grouped, and a family that wants as many KV heads as heads keeps that
        same = base.to_dict().get("num_key_value_heads") == base.to_dict().get("num_attention_heads")
        values["num_key_value_heads"] = values.get("num_attention_heads", 4) if same else 2
    if getattr(base, "q_lora_rank", None):
        values["q_lora_rank"] = 32
    for name in _DENSE_FIRST:
        if isinstance(getattr(base, name, None), int):
            values[name] = min(getattr(base, name), 1)
    if isinstance(getattr(base, "mlp_only_layers", None), list):
        values["mlp_only_layers"] = []
    for name in _TOKEN_IDS:
        if isinstance(t := getattr(base, name, None), int) and t >= vocab_size:
            values[name] = vocab_size - 1
    values.update(_EXTRA.get(model_type, {}))
    values.update(overrides)
    config = AutoConfig.for_model(model_type, **values)
    kept = {name: kinds for name in declared if name.endswith("layer_types") and name not in values
            and (kinds := _kept_kinds(getattr(base, name), getattr(config, name)))}
    return AutoConfig.for_model(model_type, **values, **kept) if kept else config


def _kept_kinds(full: Any, tiny: Any) -> list | None:
    """A per-layer pattern of the tiny model (`layer_types`, `mlp_layer_types`) that holds every kind of
    layer the full-size pattern has (a hybrid's full-attention layer, the sparse MoE layer after dense
    ones), the missing kinds put last; None when nothing is missing (or the pattern cannot hold them all)."""
    if not isinstance(full, list) or not isinstance(tiny, list) or not tiny:
        return None
    missing = [kind for kind in dict.fromkeys(full) if kind not in tiny]
    if not missing or len(missing) > len(tiny):
        return None
    return tiny[: len(tiny) - len(missing)] + missing


def build_tiny(model_type: str, seed: int = 0, vocab_size: int = TINY_VOCAB, **overrides):
    """A freshly initialised tiny model of the family (float32, on the CPU); a UserError, one line, when the
    family does not build from a tiny config (the reason transformers gives) or would not be tiny."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = tiny_config(model_type, vocab_size, **overrides)
        with torch.device("meta"):  # the size first: a field we do not shrink must not fill the memory
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if n > MAX_TINY_PARAMETERS:
            raise UserError(f"a tiny {model_type} still holds {n / 1e6:.0f}M parameters (a size field of its "
                            "config is not shrunk); add it to sdmoe.moe.families._SIZES")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a config it rejects
        raise UserError(f"{model_type} does not build from a tiny config ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); give it a line in sdmoe.moe.families._EXTRA") from None
