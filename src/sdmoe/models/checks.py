"""Every check of a user's checkpoint that can be made before anything is written.

    checked = check_checkpoint("ckpt/")                   # config.json against every tensor, no weight read
    checked = check_checkpoint("ckpt/", read_values=True)  # and every tensor finite (one pass over the file)
    check_tokenizer_fits(tokenizer, checked.embedding_rows, "ckpt/")

A checkpoint is judged by what transformers itself would build from its config.json: the model is
built on the meta device (no memory, no weights) and every parameter's name and shape is compared
with the safetensors headers, through transformers' own load-time renames and expert merges
(`ModelTensors`). So a field that is missing (transformers' default then applies), null, or
inconsistent with another field or with the weights is one line naming the field or the tensor,
instead of a traceback at load time, or worse, a load that silently drops what config.json does
not describe (a layer count lower than the weights' layers). `upcycle`, `train --init` and the
compares that start from a checkpoint call this first, before their first write.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdmoe.errors import UserError
from sdmoe.moe.checkpoint import INDEX_FILE, ModelTensors, SafetensorsWeights, check_model_dir

# config.json fields whose transformers default would quietly stand in when they are absent, named in
# the message of a shape that disagrees with the weights
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts", "num_local_experts",
                 "n_routed_experts", "shared_expert_intermediate_size")
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")
# tensors quantised checkpoints carry beside (or instead of) a weight: checked by their own reader
_QUANT_SUFFIXES = ("_scale_inv", "_blocks", "_scales", ".weight_scale", ".input_scale")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class CheckedCheckpoint:
    """A checkpoint that passed: its config (as written and as transformers reads it) and its tensors."""

    path: Path
    raw: dict  # config.json as written
    config: Any  # transformers' PretrainedConfig
    weights: SafetensorsWeights
    embedding_rows: int  # the input embedding's rows: every token id must be below this
    experts: int | None  # routed experts per MoE layer (None: a dense model)

    def tensor_bytes(self, key: str) -> int:
        """The size of saved tensor `key` in bytes (from its header; nothing is read)."""
        n = 1
        for s in self.weights.shape(key):
            n *= s
        return n * _DTYPE_BYTES.get(_dtype_of(self.weights, key), 4)


def check_checkpoint(path: str | Path, read_values: bool = False) -> CheckedCheckpoint:
    """`path` as a transformers checkpoint that loads whole and as its config.json describes; a one-line
    UserError for the first thing that is not. `read_values` also reads every tensor once to find NaN or
    infinite values (the commands that read every weight anyway call it; the headers alone cost nothing)."""
    p = Path(path).expanduser()
    raw = check_model_dir(p)
    config = hf_config(p)
    weights = SafetensorsWeights(p)
    _check_index(weights)
    model = _meta_model(p, config)
    _check_tensors(p, raw, config, model, weights)
    experts = _check_routing(p, raw, model)
    rows = model.get_input_embeddings().weight.shape[0]
    if read_values:
        for key in weights.keys():
            weights.get(key)  # names the first tensor holding NaN or an infinity
    return CheckedCheckpoint(p, raw, config, weights, int(rows), experts)


def hf_config(path: Path):
    """transformers' own reading of config.json (its types and the rules between its fields), in one line
    when it refuses: a null where a number belongs, a per-layer list whose length is not the layer count."""
    from transformers import AutoConfig

    try:
        with _quiet():
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, TypeError, KeyError, ... here
        raise UserError(f"{path / 'config.json'} is inconsistent ({_first_line(e)}); fix that field, or re-save "
                        "the model with save_pretrained") from None


def check_tokenizer_fits(tokenizer, embedding_rows: int, path: str | Path) -> None:
    """Every id the tokenizer can produce has a row in the model's embedding (else the first forward
    fails with an index error deep in torch). An empty vocabulary `load_tokenizer` refuses already."""
    if len(tokenizer) > embedding_rows:
        raise _too_many_tokens(path, len(tokenizer), embedding_rows)


def check_tokenizer_file_fits(path: str | Path, embedding_rows: int) -> None:
    """`check_tokenizer_fits` for a checkpoint's tokenizer.json read as a file (no eos or fast-tokenizer
    requirements: a command that only copies the tokenizer, such as upcycle, checks just this)."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return
    try:
        n = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types for a damaged file
        raise UserError(f"cannot read {file} ({_first_line(e)}); re-save the tokenizer") from None
    if n > embedding_rows:
        raise _too_many_tokens(path, n, embedding_rows)


def _too_many_tokens(path: str | Path, n: int, rows: int) -> UserError:
    return UserError(f"the tokenizer in {path} has {n} tokens but the model's embedding has {rows} rows "
                     f"(vocab_size): ids from {rows} on have no embedding; use the tokenizer the model was trained "
                     "with, or resize the embeddings (model.resize_token_embeddings) and re-save")


def check_finite_parameters(model: torch.nn.Module, path: str | Path) -> None:
    """Every parameter and buffer of a loaded model finite: a NaN in a checkpoint would otherwise show up as
    a non-finite loss at the first step, after the run directory was written."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2: each rank checks its own shard
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            raise UserError(f"tensor {name} in {path} holds NaN or infinite values; the run that wrote it diverged "
                            "or the file is damaged: start from an earlier checkpoint or re-download it")


# -- the parts ---------------------------------------------------------------------------------------


def _check_index(weights: SafetensorsWeights) -> None:
    """Every tensor the index names is in the file it names (a wrong shard would fail at load time)."""
    by_file: dict[Path, list[str]] = {}
    for key, file in weights.key_file.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        held = set(weights._open(file).keys())
        missing = [k for k in keys if k not in held]
        if missing:
            raise UserError(f"{INDEX_FILE} in {weights.path} puts {missing[0]} in {file.name}, which does not hold "
                            f"it ({len(missing)} such tensors); re-download or re-save the checkpoint")


def _meta_model(path: Path, config):
    """The model transformers builds from `config`, on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a config transformers accepts may still not build
        raise UserError(f"transformers cannot build a model from {path / 'config.json'} ({_first_line(e)}); fix "
                        "config.json, or re-save the model with save_pretrained") from None


def _expected(model) -> dict[str, tuple[int, ...]]:
    """Parameter and persistent-buffer names with their shapes; a tied weight counts once."""
    names = {n: tuple(t.shape) for n, t in model.named_parameters()}
    state = model.state_dict(keep_vars=True)
    names.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in state})
    return names


def _loaded_names(model, keys: list[str]) -> dict[str, tuple[str, bool]]:
    """Each saved key under the name transformers loads it as, by transformers' own conversion rules for this
    model (`get_model_conversion_mapping`: renames, then at most one converter, as `from_pretrained` applies
    them): {model name: (a saved key, whether a converter made it)}. A converter with several targets
    (one tensor split into several) names them all."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = model.state_dict()
    names: dict[str, tuple[str, bool]] = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if name not in meta and key in meta:  # as the loader does: a rule that should not have fired
            name, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta)
        names.setdefault(name, (key, pattern is not None))
        converter = next((c for c in converters if pattern is not None and pattern in c.source_patterns), None)
        for target in (converter.target_patterns[1:] if converter else ()):
            names.setdefault(name.replace(converter.target_patterns[0], target), (key, True))
    return names


def _check_tensors(path: Path, raw: dict, config, model, weights: SafetensorsWeights) -> None:
    expected = _expected(model)
    quantised = "quantization_config" in raw
    keys = [k for k in weights.keys() if not (quantised and k.endswith(_QUANT_SUFFIXES))]
    loaded = _loaded_names(model, keys)
    if quantised:  # a packed weight (`<name>_blocks`) stands for `<name>`; its reader checks its shapes
        packed = {k for k in weights.keys() if k.endswith(_QUANT_SUFFIXES)}
        loaded.update({n: (n, True) for n in expected if any(f"{n}{s}" in packed for s in _QUANT_SUFFIXES)})
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", False) \
        else set()
    layers = config.num_hidden_layers
    extra = sorted(set(loaded) - set(expected), key=_natural)
    beyond = [k for k in extra if (m := _LAYER.search(k)) and int(m.group(1)) >= layers]
    if beyond:
        last = max(int(_LAYER.search(k).group(1)) for k in beyond)
        raise UserError(f"the weights in {path} hold decoder layers up to {last} (e.g. {beyond[0]}) but config.json "
                        f"names num_hidden_layers={layers}: loading would drop layers {layers}..{last}; set "
                        f"num_hidden_layers={last + 1} in config.json, or re-save the model")
    if extra:
        raise UserError(f"the weights in {path} hold {len(extra)} tensor(s) that config.json does not describe "
                        f"(e.g. {extra[0]}){_absent_hint(raw)}; fix config.json, or re-save the model")
    missing = sorted(set(expected) - set(loaded) - tied, key=_natural)
    if missing:
        raise UserError(f"the weights in {path} lack {len(missing)} tensor(s) that config.json describes (e.g. "
                        f"{missing[0]}){_absent_hint(raw)}; download every shard, or fix config.json")
    merged = ModelTensors(weights, config.model_type)  # the expert merges whose shape we can compute
    for name in sorted(expected, key=_natural):
        key, converted = loaded.get(name, (None, False))
        if key is None or (converted and name not in merged.merged):
            continue  # tied, packed, or made by a converter whose result shape only loading computes
        got = tuple(merged.shape(name)) if converted else tuple(weights.shape(key))
        if got != expected[name]:
            raise UserError(f"tensor {name} in {path} has shape {list(got)} but config.json gives "
                            f"{list(expected[name])}{_absent_hint(raw)}; fix config.json, or re-save the model")


def _check_routing(path: Path, raw: dict, model) -> int | None:
    """Routed experts per layer (None for a dense model); a top-k above them is refused (it fails at the
    first forward in torch.topk)."""
    from sdmoe.moe import find_moe_blocks

    try:
        blocks = find_moe_blocks(model)
    except UserError:
        return None
    experts = min(b.num_experts for b in blocks)
    for name in _TOP_K_FIELDS:
        k = raw.get(name)
        if isinstance(k, int) and not isinstance(k, bool) and not 1 <= k <= experts:
            raise UserError(f"{path / 'config.json'} has {name}={k} but each MoE layer has {experts} experts; set "
                            f"{name} to 1..{experts}")
    return experts


def _absent_hint(raw: dict) -> str:
    absent = [f for f in _SHAPE_FIELDS if f not in raw]
    common = [f for f in absent if f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads")]
    return f" (config.json has no {', '.join(common)}: transformers' defaults stand in)" if common else ""


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _dtype_of(weights: SafetensorsWeights, key: str) -> str:
    return weights._open(weights.key_file[key]).get_slice(key).get_dtype()


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


@contextlib.contextmanager
def _quiet():
    """transformers' warnings about a config (unused keys, defaults) are not ours to print."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
