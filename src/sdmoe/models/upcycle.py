"""`upcycle`: a dense transformers checkpoint becomes an ordinary transformers MoE checkpoint.

    upcycle("qwen3-dense/", "qwen3-moe/", experts=8, top_k=2)                      # copy: the dense function
    upcycle("qwen3-dense/", "qwen3-drop/", experts=8, top_k=2, method="drop")      # Drop-Upcycling, ratio 0.5
    upcycle("qwen3-dense/", "qwen3-fine/", experts=16, top_k=4, granularity=4)     # Qwen1.5-MoE's segments

Every non-FFN weight (embeddings, attention, norms, the LM head) is copied exactly (BTX: see below);
each decoder layer's FFN becomes E experts and a router, initialised small (normal, the dense config's
`initializer_range`) or from prompts. Methods:

- `copy`: every expert is the FFN (mergekit-moe's recipe). With granularity 1 the MoE computes
  the dense function exactly (the routing weights are renormalised over the top-k and sum to 1):
  the experts start identical, the paper's failure in its purest form;
- `noise`: the copy plus Gaussian noise of `noise` times each weight's own std, per expert;
- `drop`: Drop-Upcycling (Nakamura et al., ICLR 2025): in each expert a random `drop_ratio` of the
  intermediate neurons (rows of gate and up, columns of down) re-initialised from a normal with
  the dense weight's own mean and std.

`granularity` G splits the FFN's neurons into G segments (each expert one segment, expert i
segment i mod G, as Qwen1.5-MoE was upcycled from Qwen-1.8B); the down projections are scaled by
G so that, with the top-k weights renormalised, the expected output matches the dense FFN's.
Only G = 1 with `copy` preserves the function exactly.

`shared_expert` (qwen2 -> qwen2_moe, whose MoE block adds `sigmoid(shared_expert_gate(x)) *
shared_expert(x)` to the routed experts' renormalised top-k sum): the shared expert is a copy of the whole FFN
and its gate is zero, so it adds exactly half the FFN (sigmoid(0) = 1/2 for every token); the routed experts'
down projections are halved, so their top-k sum is the other half. Both start carrying the dense function and
both learn from the first step, and the sum is the dense FFN exactly (a power-of-two scale is exact in every
float format). Without it the shared expert is silent (its down projection zero; the routed experts carry
it all). A shared gate from prompts (mergekit's) would make the split depend on the token, so it stays zero.

Routers (`router`, `sdmoe.models.upcycle_routers`): `random` (small normal, seeded), or from prompts that
describe each expert, as mergekit-moe's `gate_mode` does: `hidden` / `hidden_avg` (the dense model's hidden
states entering each layer), `embed` (token embeddings). With `copy` the function stays the dense one
whatever the routers hold: the top-k weights are renormalised over identical experts.

Branch-Train-Mix (`experts_from`: dense fine-tunes of the dense model, Sukhbaatar et al. 2024): expert i's FFN
is fine-tune (i mod n)'s, the other weights (attention, embeddings, norms, LM head) their average (`average`,
BTX's recipe: every fine-tune's attention co-adapted with its FFN, and the average keeps a share of each)
or the dense model's (`base`). The fine-tunes must be the dense model's family, with its tensors' names and
shapes, its config (sizes, rope, norms) and its vocabulary; tensors are cast to the dense model's dtype.

Families (the dense model types whose MoE sibling transformers has): qwen3 -> qwen3_moe,
qwen2 -> qwen2_moe, mistral and llama -> mixtral (llama without attention or MLP biases). OLMo-2 -> OLMoE is
refused: OLMo-2 normalises after attention and after the FFN, OLMoE before, so no weight-for-weight mapping
exists.

config.json is what `save_pretrained` writes for the MoE model (its `architectures`, `dtype`: the dense
weights' own, and `transformers_version`); the dense model's generation_config.json is kept, or, when it
has none, the one `save_pretrained` would write.

Memory: the dense weights are memory-mapped and the output written one shard per decoder layer
(safetensors, with a `model.safetensors.index.json`), so the peak is the mapped dense model's pages
plus one layer's experts (`benchmarks/bench_upcycle.py`: Qwen-1.8B's shapes to 8 experts, 4.5 GiB
for a 14 GiB output); `hidden` routers load the dense model once, in float32, before the first write.
The output directory appears whole or not at all (`atomic_dir`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdmoe.config_fields import MAX_SEED, check_tree, setting
from sdmoe.device import available_memory
from sdmoe.errors import UserError
from sdmoe.files import atomic_dir, check_new_output_dir, size_text, write_failure
from sdmoe.models.checks import CheckedCheckpoint, _dtype_of, check_checkpoint, check_tokenizer_file_fits
from sdmoe.models.upcycle_routers import (
    FROM_PROMPTS,
    ExpertPrompts,
    Router,
    check_prompt_lengths,
    check_router_request,
    prompt_tokenizer,
    read_prompts,
    router_vectors,
)
from sdmoe.moe.checkpoint import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, SafetensorsWeights, check_model_dir
from sdmoe.moe.quantized import refuse_quantized

Method = Literal["copy", "noise", "drop"]
METHODS = ("copy", "noise", "drop")
NonExpert = Literal["average", "base"]
# the files besides the weights and config.json that travel with the model
_KEPT_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
               "added_tokens.json", "generation_config.json", "chat_template.jinja")
# config.json keys that describe the dense FFN (dropped) or say what the file is (rewritten)
_NOT_COPIED = ("architectures", "model_type", "transformers_version", "intermediate_size", "mlp_bias", "auto_map",
               "dtype", "torch_dtype")
# safetensors' dtype names -> torch's, as save_pretrained writes them into config.json
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# config fields BTX fine-tunes may differ in (what the file is, generation and token ids): the rest must agree
_BTX_FREE = ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
             "bos_token_id", "eos_token_id", "pad_token_id", "output_hidden_states", "output_attentions",
             "return_dict", "id2label", "label2id")


@dataclass(frozen=True)
class Family:
    """How one dense model type maps onto its MoE sibling."""

    dense: str
    moe: str
    block: str  # the MoE block's name in a decoder layer ("mlp", Mixtral's "block_sparse_moe")
    names: tuple[str, str, str]  # the per-expert (gate, up, down) names the MoE checkpoint uses
    experts_key: str  # the MoE config's number of experts
    ffn_key: str  # the MoE config's expert width


FAMILIES = {
    "qwen3": Family("qwen3", "qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                    "moe_intermediate_size"),
    "qwen2": Family("qwen2", "qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                    "moe_intermediate_size"),
    "mistral": Family("mistral", "mixtral", "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts",
                      "intermediate_size"),
    "llama": Family("llama", "mixtral", "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts",
                    "intermediate_size"),
}
SUPPORTED = ", ".join(f"{f.dense} -> {f.moe}" for f in FAMILIES.values())
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
_DENSE_FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass
class UpcycleResult:
    out_dir: Path
    family: Family
    experts: int
    top_k: int
    method: str
    granularity: int
    layers: int
    parameters: int  # in the output
    dense_parameters: int
    router: str = "random"
    fine_tunes: int = 0  # BTX: the fine-tunes the experts came from (0: all from the dense model)
    non_expert_from: str = "average"

    def summary(self) -> str:
        source = (f"experts from {self.fine_tunes} fine-tunes (non-expert weights: {self.non_expert_from}), "
                  if self.fine_tunes else "")
        return (f"upcycled a {self.family.dense} model ({self.dense_parameters:,} parameters) into a {self.family.moe} "
                f"MoE of {self.experts} experts, top-{self.top_k}, {self.layers} layers, method {self.method}, "
                f"granularity {self.granularity}, {source}{self.router} routers ({self.parameters:,} parameters); "
                f"saved to {self.out_dir}")


@dataclass
class UpcycleRequest:
    """What the user asked for: the options of `sdmoe upcycle`, each declared with its range (checked by
    `config_fields.check_tree`, the way every config value is: finite numbers, seeds a generator takes)."""

    experts: int = setting(8, ge=1)
    top_k: int = setting(2, ge=1)
    method: Method = "copy"
    granularity: int = setting(1, ge=1)
    shared_expert: bool = False
    drop_ratio: float = setting(0.5, gt=0, le=1)
    noise: float = setting(0.01, gt=0)
    seed: int = setting(0, ge=0, le=MAX_SEED)
    router: Router = "random"
    prompts: tuple[str, ...] = ()  # --router hidden/hidden_avg/embed: a file per expert, or one .json/.yaml
    experts_from: tuple[str, ...] = ()  # BTX: dense fine-tunes of the dense model, expert i from (i mod n)
    non_expert_from: NonExpert = "average"  # BTX: attention, embeddings, norms from the fine-tunes' mean or the base


def check_request(config: dict, path: Path, request: UpcycleRequest, min_experts: int = 2) -> Family:
    """Every refusal of the request itself (its options, and what they ask of this model's family and
    FFN), before any weight is read: one line each, naming the fix."""
    check_tree(request, flags=True)
    model_type = config.get("model_type")
    if any(k in config for k in _MOE_KEYS) or str(model_type).endswith("moe") or model_type == "mixtral":
        raise UserError(f"{path} is already an MoE ({model_type}); upcycle takes a dense model, and "
                        "`sdmoe train --init` continues training an MoE")
    if model_type == "olmo2":
        raise UserError("OLMo-2 cannot be upcycled into OLMoE weight for weight (OLMo-2 normalises after attention "
                        f"and the FFN, OLMoE before); supported: {SUPPORTED}")
    if model_type not in FAMILIES:
        raise UserError(f"{path} is a {model_type!r} model, which upcycle does not map onto an MoE; supported: "
                        f"{SUPPORTED}")
    experts, top_k, granularity = request.experts, request.top_k, request.granularity
    if experts < min_experts:
        raise UserError(f"--experts {experts}: an MoE needs at least 2 experts")
    if not 1 <= top_k <= experts:
        raise UserError(f"--top-k {top_k}: choose 1 to --experts ({experts})")
    ffn = config.get("intermediate_size")
    if not isinstance(ffn, int) or isinstance(ffn, bool) or ffn < 1:
        raise UserError(f"{path / 'config.json'} names no intermediate_size (the dense FFN's width); fix config.json "
                        "or re-save the dense model")
    if ffn % granularity:
        raise UserError(f"--granularity {granularity} does not divide the FFN width {ffn}; choose a divisor of {ffn}")
    if experts % granularity:
        raise UserError(f"--experts {experts} is not a multiple of --granularity {granularity}: each of the "
                        f"{granularity} segments needs the same number of experts")
    if request.shared_expert and model_type != "qwen2":
        raise UserError(f"--shared-expert: {FAMILIES[model_type].moe} has no shared expert; only qwen2 -> qwen2_moe")
    n = len(request.experts_from)
    if n and granularity > 1:
        raise UserError(f"--granularity {granularity} with --experts-from: BTX experts are whole FFNs of the "
                        "fine-tunes; drop --granularity")
    if n and experts % n:
        raise UserError(f"--experts {experts} is not a multiple of the {n} --experts-from directories (expert i "
                        f"takes fine-tune i mod {n}); use --experts {n} or a multiple of it")
    if not n and request.non_expert_from != "average":
        raise UserError(f"--non-expert-from {request.non_expert_from} chooses where BTX takes the non-expert weights "
                        "from; it needs --experts-from DIR..., or drop it")
    check_router_request(request.router, request.prompts)
    if model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise UserError("this llama model has attention or MLP biases, which mixtral has not; only bias-free llama "
                        "models map onto mixtral")
    return FAMILIES[model_type]


def moe_config(dense: dict, family: Family, experts: int, top_k: int, granularity: int, shared_expert: bool,
               dtype: str = "float32"):
    """The MoE's transformers config: the dense one's settings, the experts' and the router's on top, and
    what `save_pretrained` adds when it saves a model (its class as `architectures`, its weights' `dtype`)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ffn = dense["intermediate_size"]
    fields = {k: v for k, v in dense.items() if k not in _NOT_COPIED}
    fields.update({family.experts_key: experts, "num_experts_per_tok": top_k, family.ffn_key: ffn // granularity,
                   "output_router_logits": True, "router_aux_loss_coef": 0.01,
                   "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family.moe]], "dtype": dtype})
    if family.moe in ("qwen3_moe", "qwen2_moe"):
        fields.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=ffn)
    if family.moe == "qwen2_moe":
        fields.update(shared_expert_intermediate_size=ffn if shared_expert else ffn // granularity, qkv_bias=True)
    if family.moe == "mixtral":
        fields.setdefault("head_dim", dense["hidden_size"] // dense["num_attention_heads"])
        fields.pop("attention_bias", None)
        fields.pop("pretraining_tp", None)
    return AutoConfig.for_model(family.moe, **fields)


def weights_dtype(checked: CheckedCheckpoint) -> str:
    """The dtype `save_pretrained` would record for a model of these weights: its first floating parameter's,
    the input embedding's (the MoE keeps it, and every tensor copied keeps its dtype)."""
    keys = checked.weights.keys()
    key = next((k for k in keys if k.endswith("embed_tokens.weight")), keys[0])
    return _DTYPE_NAMES.get(_dtype_of(checked.weights, key), "float32")


@dataclass
class UpcyclePlan:
    """An upcycle that passed every check: what will be written where, and how large it is."""

    src: Path
    out: Path
    request: UpcycleRequest
    family: Family
    checked: CheckedCheckpoint
    config: Any  # the MoE's transformers config
    groups: list[tuple[int | None, list[str]]]  # the output's shards: (decoder layer or None, dense keys)
    output_bytes: int
    largest_shard_bytes: int  # in memory at once while writing
    sources: list[CheckedCheckpoint] = field(default_factory=list)  # BTX: the fine-tunes, checked
    prompts: list[ExpertPrompts] | None = None  # routers from prompts: each expert's
    tokenizer: Any = None  # the dense model's, for the prompts
    values_checked: bool = True  # every tensor read once and found finite (no second check while writing)

    @property
    def layers(self) -> int:
        return int(self.checked.config.num_hidden_layers)


def plan_upcycle(dense_dir: str | Path, out_dir: str | Path, request: UpcycleRequest, min_experts: int = 2,
                 read_values: bool = True, flag: str = "--out") -> UpcyclePlan:
    """Every check `upcycle` makes, nothing written: the request, the dense checkpoint (config.json against
    every tensor; with `read_values`, every tensor finite), BTX's fine-tunes against it, the prompts, and
    the output (a new directory on a writable disk with room for it, one layer's experts, and the dense
    model that `hidden` routers run, within the memory available)."""
    src = Path(dense_dir).expanduser()
    family = check_request(check_model_dir(src), src, request, min_experts)
    prompts = read_prompts(request.prompts, request.experts) if request.router in FROM_PROMPTS else None
    refuse_quantized(src, "upcycle")  # it copies the weights as they are: FP8 / MXFP4 ones are refused
    checked = check_checkpoint(src)
    check_tokenizer_file_fits(src, checked.embedding_rows)  # the MoE keeps the embedding and the tokenizer
    sources = [check_fine_tune(checked, Path(d).expanduser()) for d in request.experts_from]
    tokenizer = None
    if prompts is not None:
        tokenizer = prompt_tokenizer(src)
        check_prompt_lengths(prompts, tokenizer)
    config = checked.config
    n_layers = int(config.num_hidden_layers)
    # the sizes as transformers reads them (a field config.json leaves out has its default, which the weights
    # were just checked against)
    dense = {**checked.raw, **{k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                "num_attention_heads", "intermediate_size")}}
    moe = moe_config(dense, family, request.experts, request.top_k, request.granularity, request.shared_expert,
                     weights_dtype(checked))
    groups = _shard_groups(checked.weights.keys(), n_layers)
    shard_bytes = [sum(_output_bytes(checked, key, layer, family, request) for key in keys)
                   + (request.experts * int(config.hidden_size) * 4 if layer is not None else 0)
                   for layer, keys in groups]
    out = Path(out_dir).expanduser()
    need = sum(shard_bytes)
    check_new_output_dir(out, need, f"model-00001-of-{len(groups):05d}.safetensors", flag)
    memory = available_memory()
    # one shard's tensors, plus the generator's temporaries for one expert tensor (a fraction of it)
    if memory is not None and max(shard_bytes) * 1.25 > memory:
        raise UserError(f"one layer of {request.experts} experts takes about {size_text(max(shard_bytes))} in memory "
                        f"(the whole output {size_text(need)}) but {size_text(memory)} is available; choose fewer "
                        "--experts or a larger --granularity")
    if memory is not None and request.router in ("hidden", "hidden_avg"):
        _check_router_memory(checked, prompts, tokenizer, memory, request.router)
    if read_values:  # last: the one check that reads every weight, after every cheap one passed
        for c in (checked, *sources):
            check_finite(c)
    return UpcyclePlan(src, out, request, family, checked, moe, groups, need, max(shard_bytes), sources, prompts,
                       tokenizer, read_values)


def _check_router_memory(checked: CheckedCheckpoint, prompts: list[ExpertPrompts], tokenizer, memory: int,
                         router: str) -> None:
    """`hidden` routers run the dense model in float32 on batches of prompts (every layer's hidden states
    kept, eager attention's scores): refused when that cannot fit, before anything is written."""
    from sdmoe.models.upcycle_routers import BATCH, encode

    c = checked.config
    longest = max(encode(tokenizer, [t])["input_ids"].shape[1] for e in prompts for t in (*e.positive, *e.negative))
    d, f, layers, heads = int(c.hidden_size), int(c.intermediate_size), int(c.num_hidden_layers), int(
        c.num_attention_heads)
    weights = sum(math.prod(checked.weights.shape(k)) for k in checked.weights.keys()) * 4
    acts = BATCH * longest * 4 * ((layers + 1) * d + 3 * f + heads * longest)
    if (weights + acts) * 1.25 > memory:
        raise UserError(f"--router {router} runs the dense model in float32 ({size_text(weights)}, with a batch of "
                        f"prompts {size_text(weights + acts)}) but {size_text(memory)} is available; use --router "
                        "embed (token embeddings only), or shorter prompts")


def check_finite(checked: CheckedCheckpoint) -> None:
    """Every tensor read once and finite, before anything is written: one pass of aminmax (NaN and the
    infinities propagate to its ends) costs no copy and about a twentieth of isfinite's time on bf16."""
    weights = checked.weights
    for key in weights.keys():
        t = weights.stored(key)[:]
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise UserError(f"tensor {key} in {weights.key_file[key]} holds NaN or infinite values; the run that "
                                "wrote it diverged or the file is damaged: upcycle an earlier checkpoint or "
                                "re-download it")


def check_fine_tune(base: CheckedCheckpoint, path: Path) -> CheckedCheckpoint:
    """One BTX fine-tune against the dense model it should branch from: the same family, tensor names and
    shapes (from the headers), config and vocabulary; one line for the first difference."""
    where = f"--experts-from {path}"
    if not path.is_dir():
        raise UserError(f"{where} is not a directory; give the fine-tunes' checkpoint directories (save_pretrained "
                        "output)")
    raw = check_model_dir(path)
    if raw.get("model_type") != base.raw.get("model_type"):
        raise UserError(f"{where} is a {raw.get('model_type')!r} model but {base.path} is "
                        f"{base.raw.get('model_type')!r}; BTX experts are fine-tunes of the dense model: give "
                        "fine-tunes of that one model")
    refuse_quantized(path, "upcycle")
    checked = check_checkpoint(path)
    mine, theirs = base.weights.keys(), set(checked.weights.keys())
    for key in mine:
        if key not in theirs:
            raise UserError(f"{where} has no {key} (which {base.path} has); BTX experts are fine-tunes of the dense "
                            "model, with its tensors")
        if checked.weights.shape(key) != base.weights.shape(key):
            raise UserError(f"{where}: {key} has shape {list(checked.weights.shape(key))} but {base.path}'s is "
                            f"{list(base.weights.shape(key))}; BTX experts are fine-tunes of the dense model, with "
                            "its shapes")
    if extra := sorted(theirs - set(mine)):
        raise UserError(f"{where} has {extra[0]} (and {len(extra)} tensors in all) that {base.path} has not; BTX "
                        "experts are fine-tunes of the dense model, with its tensors")
    a, b = _config_that_computes(base.config), _config_that_computes(checked.config)
    if diff := next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None):
        raise UserError(f"{where}'s config.json has {diff}={b.get(diff)!r} but {base.path}'s has {a.get(diff)!r}; BTX "
                        "experts are fine-tunes of the dense model, with its config")
    _check_same_vocabulary(base.path, path, where)
    return checked


def _config_that_computes(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _BTX_FREE and not k.startswith("_")}


def _check_same_vocabulary(base: Path, path: Path, where: str) -> None:
    """The fine-tune's tokenizer gives the ids the dense model's does (the MoE keeps one embedding)."""
    from tokenizers import Tokenizer

    for name in TOKENIZER_FILES:
        mine, theirs = base / name, path / name
        if not mine.is_file() and not theirs.is_file():
            continue
        if mine.is_file() != theirs.is_file():
            raise UserError(f"{where} {'lacks' if mine.is_file() else 'has'} {name}, {base} "
                            f"{'has' if mine.is_file() else 'has not'}; BTX experts share the dense model's vocabulary")
        if name == "tokenizer.json":  # the vocabulary, not the file's padding or truncation settings
            try:
                same = (Tokenizer.from_file(str(mine)).get_vocab(with_added_tokens=True)
                        == Tokenizer.from_file(str(theirs)).get_vocab(with_added_tokens=True))
            except Exception as e:  # noqa: BLE001 - tokenizers raises its own types for a damaged file
                why = " ".join(str(e).split())[:120]
                raise UserError(f"cannot read {theirs} ({why}); re-save the tokenizer") from None
        else:
            same = mine.read_bytes() == theirs.read_bytes()
        if not same:
            raise UserError(f"{where}'s vocabulary ({name}) differs from {base}'s; BTX experts share the dense "
                            "model's embedding, so every fine-tune must keep its tokenizer")


def _output_bytes(checked: CheckedCheckpoint, key: str, layer: int | None, family: Family,
                  request: UpcycleRequest) -> int:
    """The bytes dense tensor `key` becomes in the MoE: itself, or its experts (and a shared expert)."""
    size = checked.tensor_bytes(key)
    if not _is_ffn(key, layer):
        return size
    g = request.granularity
    out = request.experts * size // g
    if family.moe == "qwen2_moe":
        out += size if request.shared_expert else size // g
    return out


def upcycle(dense_dir: str | Path, out_dir: str | Path, experts: int | None, top_k: int, method: Method = "copy",
            granularity: int = 1, shared_expert: bool = False, drop_ratio: float = 0.5, noise: float = 0.01,
            seed: int = 0, progress: bool = True, min_experts: int = 2, router: str = "random",
            prompts: tuple[str | Path, ...] = (), experts_from: tuple[str | Path, ...] = (),
            non_expert_from: str = "average") -> UpcycleResult:
    """Upcycle the dense checkpoint in `dense_dir` into an MoE checkpoint in `out_dir` (see the module doc).

    min_experts=1 allows a one-expert "MoE": the dense model itself in the MoE family's classes (the
    router of one expert weighs it 1), which `sdmoe train` can train on as the dense anchor. `experts`
    None: one expert per `experts_from` fine-tune."""
    if experts is None:
        if not experts_from:
            raise UserError("--experts is missing: give the routed experts per layer (--experts 8), or --experts-from "
                            "DIR... (one expert per fine-tune)")
        experts = len(experts_from)
    request = UpcycleRequest(experts, top_k, method, granularity, shared_expert, drop_ratio, noise, seed, router,
                             tuple(map(str, prompts)), tuple(map(str, experts_from)), non_expert_from)
    return write_upcycle(plan_upcycle(dense_dir, out_dir, request, min_experts), progress)


def write_upcycle(plan: UpcyclePlan, progress: bool = True) -> UpcycleResult:
    """Write what `plan_upcycle` checked: one shard a decoder layer, into a temp directory renamed to the
    output at the end (whole or nothing; SIGTERM and a full disk leave nothing behind)."""
    req, family, weights = plan.request, plan.family, plan.checked.weights
    # routers from prompts: the dense model runs before anything is written, so its failure leaves nothing
    routers_LED = None
    if plan.prompts is not None:
        weights.close()  # the validation's mapped pages, before the dense model loads (reopened when read)
        routers_LED = router_vectors(req.router, plan.src, weights, plan.prompts, plan.tokenizer, plan.layers)
    gen = torch.Generator().manual_seed(req.seed)
    weight_map, total, size = {}, 0, 0
    try:
        with atomic_dir(plan.out) as tmp:
            plan.config.save_pretrained(tmp)
            names = [f"model-{i + 1:05d}-of-{len(plan.groups):05d}.safetensors" for i in range(len(plan.groups))]
            bar = tqdm(zip(names, plan.groups), total=len(plan.groups), desc="upcycle", unit="shard",
                       disable=not progress)
            for name, (layer, keys) in bar:
                tensors = {}
                for key in keys:
                    tensors.update(_convert(key, layer, plan, gen))
                if layer is not None:  # the router, in the layer's dtype
                    dtype = tensors[next(iter(tensors))].dtype
                    tensors[f"model.layers.{layer}.{family.block}.gate.weight"] = _router(plan, layer, routers_LED,
                                                                                          gen).to(dtype)
                total += sum(t.numel() for t in tensors.values())
                size += sum(t.numel() * t.element_size() for t in tensors.values())
                weight_map.update({k: name for k in tensors})
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / name), metadata={"format": "pt"})
                del tensors
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                                     indent=1), encoding="utf-8")
            _copy_kept_files(plan, tmp)
    except Exception as e:  # safetensors and tokenizers raise their own types for a full or read-only disk
        if (why := write_failure(e)) is None:
            raise
        raise UserError(f"could not write the upcycled model to {plan.out} ({why}); nothing was kept: free space or "
                        "choose another --out") from None
    dense_n = sum(math.prod(weights.shape(k)) for k in weights.keys())
    return UpcycleResult(plan.out, family, req.experts, req.top_k, req.method, req.granularity, plan.layers, total,
                         dense_n, req.router, len(plan.sources), req.non_expert_from)


def _router(plan: UpcyclePlan, layer: int, routers_LED: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Layer `layer`'s router (E, D): from the prompts, or small and random (the dense config's init std)."""
    if routers_LED is not None:
        return routers_LED[layer]
    std = float(plan.checked.raw.get("initializer_range", 0.02))
    return torch.randn(plan.request.experts, int(plan.checked.config.hidden_size), generator=gen) * std


def _copy_kept_files(plan: UpcyclePlan, tmp: Path) -> None:
    """The tokenizer and generation settings travel with the model; without a generation_config.json of the
    dense model's, the one save_pretrained writes for the MoE (from its config's token ids)."""
    for f in _KEPT_FILES:
        if (plan.src / f).is_file():
            shutil.copyfile(plan.src / f, tmp / f)
    if not (plan.src / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(plan.config).save_pretrained(tmp)


def _shard_groups(keys: list[str], n_layers: int) -> list[tuple[int | None, list[str]]]:
    """The output's shards: the embedding (and whatever else sits outside the layers), each decoder layer,
    the LM head: one layer's experts in memory at a time."""
    layer_of = {}
    for k in keys:
        parts = k.split(".")
        layer_of[k] = int(parts[2]) if k.startswith("model.layers.") and parts[2].isdigit() else None
    outside = [k for k in keys if layer_of[k] is None and not k.startswith("lm_head")]
    head = [k for k in keys if k.startswith("lm_head")]
    groups = [(None, sorted(outside))]
    groups += [(i, sorted(k for k in keys if layer_of[k] == i)) for i in range(n_layers)]
    if head:
        groups.append((None, head))
    return groups


def _is_ffn(key: str, layer: int | None) -> bool:
    prefix = f"model.layers.{layer}.mlp."
    return layer is not None and key.startswith(prefix) and key[len(prefix):].split(".")[0] in _DENSE_FFN


def _convert(key: str, layer: int | None, plan: UpcyclePlan, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One dense tensor's place in the MoE checkpoint: itself (outside the FFN; BTX: the fine-tunes' mean or
    the base's), or its experts (BTX: expert i from fine-tune i mod n) and qwen2_moe's shared expert."""
    req, family = plan.request, plan.family
    w = _read(plan, plan.checked.weights, key)
    if not _is_ffn(key, layer):
        return {key: _non_expert(key, w, plan)}
    proj = key[len(f"model.layers.{layer}.mlp."):].split(".")[0]
    role = _DENSE_FFN.index(proj)
    block = f"model.layers.{layer}.{family.block}."
    g = req.granularity
    # the routed experts' share of the dense output: all of it (G segments, each scaled by G), or half of it
    # beside a shared expert that is the whole FFN (see the module doc)
    scale = g * (0.5 if req.shared_expert else 1)
    sources = [_read(plan, s.weights, key).to(w.dtype) for s in plan.sources] or [w]
    out = {}
    for i in range(req.experts):
        src = sources[i % len(sources)]
        e = src.chunk(g, dim=1 if proj == "down_proj" else 0)[i % g].clone()
        if proj == "down_proj" and scale != 1:
            e.mul_(scale)
        # drop: the same neurons of expert i in its gate, up and down (a generator of its own per layer and expert)
        neurons = torch.Generator().manual_seed(req.seed * 1_000_003 + layer * 4099 + i)
        e = _perturb(e, src, proj, req.method, req.drop_ratio, req.noise, gen, neurons)
        out[f"{block}experts.{i}.{family.names[role]}.weight"] = e
    if family.moe == "qwen2_moe":
        out.update(_shared_expert(w, proj, block, g, req.shared_expert))
    return out


def _read(plan: UpcyclePlan, weights: SafetensorsWeights, key: str) -> torch.Tensor:
    """A tensor as stored: the plan read every one and found it finite already (a second isfinite over a
    bf16 model is 40% of the writing time); unchecked plans read through the checking `get`."""
    return weights.stored(key)[:] if plan.values_checked else weights.get(key)


def _non_expert(key: str, w: torch.Tensor, plan: UpcyclePlan) -> torch.Tensor:
    """A weight outside the experts: the dense model's, or (BTX, `average`) the fine-tunes' mean, in float32."""
    if not plan.sources or plan.request.non_expert_from == "base" or not w.is_floating_point():
        return w
    total = sum(_read(plan, s.weights, key).float() for s in plan.sources)
    return (total / len(plan.sources)).to(w.dtype)


def _shared_expert(w: torch.Tensor, proj: str, block: str, granularity: int, whole: bool) -> dict[str, torch.Tensor]:
    """qwen2_moe's shared expert (always there): the whole FFN, which its zero gate halves (the routed
    experts carry the other half), or silent, its down projection zero (the routed experts carry it all)."""
    if whole:
        shared = w.clone()
    else:
        shared = w.chunk(granularity, dim=1 if proj == "down_proj" else 0)[0].clone()
        if proj == "down_proj":
            shared.zero_()
    out = {f"{block}shared_expert.{proj}.weight": shared}
    if proj == "gate_proj":  # sigmoid(0) = 1/2 for every token: the split above stays exact
        out[f"{block}shared_expert_gate.weight"] = torch.zeros(1, w.shape[1], dtype=w.dtype)
    return out


def _perturb(e: torch.Tensor, dense: torch.Tensor, proj: str, method: str, drop_ratio: float, noise: float,
             gen: torch.Generator, neurons_gen: torch.Generator) -> torch.Tensor:
    """One expert's copy of a projection, perturbed by `method` (copy: as it is)."""
    if method == "copy":
        return e
    if method == "noise":
        return e + torch.randn(e.shape, generator=gen).to(e.dtype) * (noise * dense.float().std()).to(e.dtype)
    # drop: a random share of this expert's neurons re-drawn from the dense weight's own statistics
    neurons = e.shape[1] if proj == "down_proj" else e.shape[0]
    n_drop = max(1, round(drop_ratio * neurons))
    idx = torch.randperm(neurons, generator=neurons_gen)[:n_drop]
    mean, sd = dense.float().mean(), dense.float().std()
    if proj == "down_proj":
        e[:, idx] = (torch.randn(e.shape[0], n_drop, generator=gen) * sd + mean).to(e.dtype)
    else:
        e[idx] = (torch.randn(n_drop, e.shape[1], generator=gen) * sd + mean).to(e.dtype)
    return e



def densify(moe_dir: str | Path, out_dir: str | Path) -> Path:
    """A one-expert qwen3_moe checkpoint as the dense qwen3 model it computes (the router of one expert
    always weighs it 1): how the upcycle comparison trains its dense parent with `sdmoe train`."""
    from transformers import AutoConfig

    src, out = Path(moe_dir).expanduser(), Path(out_dir).expanduser()
    moe = check_model_dir(src)
    if moe.get("model_type") != "qwen3_moe" or moe.get("num_experts", moe.get("num_local_experts")) != 1:
        raise UserError(f"{src} is not a one-expert qwen3_moe model; densify takes what `sdmoe train` makes with "
                        "--set model.num_experts=1 --set model.top_k=1")
    weights = SafetensorsWeights(src)
    tensors = {}
    for key in weights.keys():
        if key.endswith(".mlp.gate.weight"):
            continue  # the one expert's router: its softmax is 1 whatever it holds
        tensors[key.replace(".mlp.experts.0.", ".mlp.")] = weights.get(key)
    fields = {k: v for k, v in moe.items() if k not in (*_NOT_COPIED, *_MOE_KEYS, "num_local_experts",
                                                        "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
                                                        "mlp_only_layers", "output_router_logits",
                                                        "router_aux_loss_coef")}
    # as save_pretrained would write it: the class, and the first parameter's (the embedding's) dtype
    first = tensors.get("model.embed_tokens.weight", next(iter(tensors.values())))
    cfg = AutoConfig.for_model("qwen3", **fields, intermediate_size=moe["moe_intermediate_size"],
                               architectures=["Qwen3ForCausalLM"], dtype=str(first.dtype).removeprefix("torch."))
    with atomic_dir(out) as tmp:
        cfg.save_pretrained(tmp)
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        for f in _KEPT_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
    return out
