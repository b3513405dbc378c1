"""Starting from a trained model: a local transformers MoE checkpoint as `train --init PATH` takes it.

    cfg.model = model_config_of("ckpt/")    # config.json only: the run's model section, checked early
    model = load_init_model("ckpt/", device)  # the weights, ready to train
    tokenizer = load_tokenizer("ckpt/")      # the checkpoint's own: the text is tokenised with it

Safetensors only and no code ever run (`check_model_dir`: no `auto_map`, weights files that are
regular files); a dense checkpoint is pointed to `sdmoe upcycle`; weights that disagree with
config.json are one line, not transformers' multi-line load report.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sdmoe.errors import UserError
from sdmoe.models.config import STYLE_CHOICES, ModelConfig
from sdmoe.moe.checkpoint import check_model_dir

# Where a config names top-k, for a router that does not say it itself (`top_k` on the router or its block).
_TOP_K = ("num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "num_experts_per_token", "top_k")


def _int(config, name: str, default: int = 0) -> int:
    """A positive integer field of a transformers config, or `default`: absent, None, a per-layer list, or a
    field the config refuses to give globally (a per-layer attribute) is no value here."""
    try:
        v = getattr(config, name, None)
    except Exception:  # noqa: BLE001 - transformers' per-layer configs raise their own error types
        return default
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def _meta_blocks(config, p: Path, model_type: str):
    """The checkpoint's MoE blocks, read off its model built on the meta device (no memory, no weights):
    the experts' count and widths are what the model holds, whatever its config calls them."""
    from transformers import AutoModelForCausalLM

    from sdmoe.moe import find_moe_blocks
    from sdmoe.moe.families import declares_experts

    try:
        with _quiet_transformers(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a config it cannot build
        raise UserError(f"transformers cannot build the {model_type} model {p / 'config.json'} describes "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); fix config.json or re-save "
                        "the model") from None
    try:
        return find_moe_blocks(model)
    except UserError:
        if not declares_experts(config):
            raise UserError(f"{p} is a dense {model_type} model (no experts in config.json); upcycle it into an "
                            f"MoE first: sdmoe upcycle {p} --experts 8 --top-k 2 --out {p.name}-moe") from None
        raise


def model_config_of(path: str | Path) -> ModelConfig:
    """The `model` section of a run that starts from the checkpoint in `path` (config.json, no weights read).

    Experts, top-k and widths come from the model itself, built on the meta device (`find_moe_blocks`),
    so every family sdmoe finds experts in is described alike; the rest (layers, heads, ...) from the config."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    model_type = check_model_dir(p)["model_type"]
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    blocks = _meta_blocks(config, p, model_type)
    if model_type not in STYLE_CHOICES:
        raise UserError(f"{p} is a {model_type!r} MoE, a family this sdmoe has not been tested with (docs/families.md "
                        f"lists those it continues); --init trains {', '.join(STYLE_CHOICES)}")
    block = blocks[0]
    top_k = next((k for m in (block.router, block.module) if isinstance(k := getattr(m, "top_k", None), int)),
                 None) or next((k for n in _TOP_K if (k := _int(config, n))), 0)
    if not top_k:
        raise UserError(f"{p / 'config.json'} names no top-k (experts per token) and its router keeps none; set "
                        "num_experts_per_tok in it")
    heads = _int(config, "num_attention_heads", 1)
    return ModelConfig(style=model_type, hidden_size=block.hidden_size, num_layers=_int(config, "num_hidden_layers", 1),
                       num_heads=heads, num_kv_heads=_int(config, "num_key_value_heads"),
                       num_experts=block.num_experts, top_k=top_k, expert_ffn=block.expert_ffn,
                       shared_expert_ffn=_int(config, "shared_expert_intermediate_size"),
                       max_seq_len=_int(config, "max_position_embeddings", 2048),
                       aux_loss_coef=float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0),
                       init_std=float(getattr(config, "initializer_range", 0.02) or 0.02),
                       tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer (tokenizer.json), or one line naming the fix."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path).expanduser()
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"{p} has no tokenizer.json; save the model's fast tokenizer beside it "
                        "(AutoTokenizer.from_pretrained(...).save_pretrained(PATH))")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raises many types for a damaged file
        raise UserError(f"cannot load the tokenizer in {p} ({type(e).__name__}); re-save it") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {p} has no end-of-text token (eos_token); set one and re-save it")
    # an empty vocabulary turns any text into no tokens, which would be blamed on the text much later
    if tokenizer.vocab_size == 0 or not tokenizer("The king said", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer in {p} has an empty vocabulary (it turns text into no tokens); save the "
                        "model's own tokenizer beside it (AutoTokenizer.from_pretrained(...).save_pretrained(PATH))")
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    """transformers reports a partial load in many lines; we say it in one."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # its loading bar, for a model that loads in a moment
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_pretrained_model(path: str | Path, dtype: torch.dtype = torch.float32, checked: bool = False):
    """A local checkpoint's model (safetensors, no code): one line if its weights and config disagree.
    `checked`: the caller ran `check_model_dir` already."""
    from transformers import AutoModelForCausalLM

    from sdmoe.moe.quantized import dequantizing_loader

    p = Path(path).expanduser()
    if not checked:
        check_model_dir(p)
    # FP8 / MXFP4 weights: transformers' loader given our dequantised tensors (sdmoe.moe.quantized: why not its own)
    load = dequantizing_loader(p) or AutoModelForCausalLM.from_pretrained
    try:
        with _quiet_transformers():
            model, info = load(p, dtype=dtype, trust_remote_code=False, use_safetensors=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        if "mismatch" in str(e).lower():  # its report of tensors whose shapes config.json does not give
            raise UserError(f"the weights in {p} disagree with its config.json (tensor shapes differ from the ones "
                            "it names); re-save the model, or fix config.json") from None
        raise UserError(f"cannot load the model in {p} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                        "check the weights are complete and match config.json") from None
    problems = [f"{len(info[k])} {k.replace('_', ' ')} (e.g. {_key(info[k][0])})"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems:
        raise UserError(f"the weights in {p} disagree with its config.json: {'; '.join(problems)}; re-save the "
                        "model, or fix config.json")
    return model


def _key(k) -> str:
    return k[0] if isinstance(k, tuple) else str(k)


def load_init_model(path: str | Path, device: torch.device | str = "cpu"):
    """The checkpoint's model set up for training as `build_model`'s are: float32, router logits in every
    forward (the balance loss and the load statistics read them), no KV cache, train mode, on `device`."""
    return for_training(load_pretrained_model(path), device)


def for_training(model, device: torch.device | str = "cpu"):
    """A loaded model set up as `load_init_model` sets it up (a sharded one too: `from_pretrained_sharded`)."""
    from sdmoe.device import experts_kernel
    from sdmoe.moe import find_moe_blocks

    find_moe_blocks(model)  # one line if transformers built no MoE block we know
    model.config.output_router_logits = True
    model.config.use_cache = False
    model.config._experts_implementation = experts_kernel("auto", torch.device(device))
    model.train()
    return model.to(device)
