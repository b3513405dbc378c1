"""`upcycle`: a dense transformers checkpoint becomes an ordinary transformers MoE checkpoint.

    upcycle("qwen3-dense/", "qwen3-moe/", experts=8, top_k=2)                      # copy: the dense function
    upcycle("qwen3-dense/", "qwen3-drop/", experts=8, top_k=2, method="drop")      # Drop-Upcycling, ratio 0.5
    upcycle("qwen3-dense/", "qwen3-fine/", experts=16, top_k=4, granularity=4)     # Qwen1.5-MoE's segments

Every non-FFN weight (embeddings, attention, norms, the LM head) is copied exactly; each
decoder layer's FFN becomes E experts and a router initialised small (normal, the dense
config's `initializer_range`). Methods:

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

Families (the dense model types whose MoE sibling transformers has): qwen3 -> qwen3_moe,
qwen2 -> qwen2_moe (which always has a gated shared expert: silent at the start, its down
projection zero, unless `shared_expert` makes it a copy of the whole FFN), mistral and llama ->
mixtral (llama without attention or MLP biases). OLMo-2 -> OLMoE is refused: OLMo-2 normalises
after attention and after the FFN, OLMoE before, so no weight-for-weight mapping exists.

Memory: the dense weights are memory-mapped and the output written one shard per decoder layer
(safetensors, with a `model.safetensors.index.json`), so the peak is the mapped dense model's pages
plus one layer's experts (`benchmarks/bench_upcycle.py`: Qwen-1.8B's shapes to 8 experts, 4.2 GiB
for a 14 GiB output).
The output directory appears whole or not at all (`atomic_dir`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdmoe.config_fields import MAX_SEED, check_tree, setting
from sdmoe.device import available_memory
from sdmoe.errors import UserError
from sdmoe.files import atomic_dir, check_new_output_dir, size_text, write_failure
from sdmoe.models.checks import CheckedCheckpoint, check_checkpoint, check_tokenizer_file_fits
from sdmoe.moe.checkpoint import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, SafetensorsWeights, check_model_dir
from sdmoe.moe.quantized import refuse_quantized

Method = Literal["copy", "noise", "drop"]
METHODS = ("copy", "noise", "drop")
# the files besides the weights and config.json that travel with the model
_KEPT_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
               "added_tokens.json", "generation_config.json", "chat_template.jinja")
# config.json keys that describe the dense FFN (dropped) or say what the file is (rewritten)
_NOT_COPIED = ("architectures", "model_type", "transformers_version", "intermediate_size", "mlp_bias", "auto_map",
               "dtype", "torch_dtype")


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

    def summary(self) -> str:
        return (f"upcycled a {self.family.dense} model ({self.dense_parameters:,} parameters) into a {self.family.moe} "
                f"MoE of {self.experts} experts, top-{self.top_k}, {self.layers} layers, method {self.method}, "
                f"granularity {self.granularity} ({self.parameters:,} parameters); saved to {self.out_dir}")


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
    if model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise UserError("this llama model has attention or MLP biases, which mixtral has not; only bias-free llama "
                        "models map onto mixtral")
    return FAMILIES[model_type]


def moe_config(dense: dict, family: Family, experts: int, top_k: int, granularity: int, shared_expert: bool):
    """The MoE's transformers config: the dense one's settings, the experts' and the router's on top."""
    from transformers import AutoConfig

    ffn = dense["intermediate_size"]
    fields = {k: v for k, v in dense.items() if k not in _NOT_COPIED}
    fields.update({family.experts_key: experts, "num_experts_per_tok": top_k, family.ffn_key: ffn // granularity,
                   "output_router_logits": True, "router_aux_loss_coef": 0.01})
    if family.moe in ("qwen3_moe", "qwen2_moe"):
        fields.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=ffn)
    if family.moe == "qwen2_moe":
        fields.update(shared_expert_intermediate_size=ffn if shared_expert else ffn // granularity, qkv_bias=True)
    if family.moe == "mixtral":
        fields.setdefault("head_dim", dense["hidden_size"] // dense["num_attention_heads"])
        fields.pop("attention_bias", None)
        fields.pop("pretraining_tp", None)
    return AutoConfig.for_model(family.moe, **fields)


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

    @property
    def layers(self) -> int:
        return int(self.checked.config.num_hidden_layers)


def plan_upcycle(dense_dir: str | Path, out_dir: str | Path, request: UpcycleRequest, min_experts: int = 2,
                 read_values: bool = True, flag: str = "--out") -> UpcyclePlan:
    """Every check `upcycle` makes, nothing written: the request, the dense checkpoint (config.json against
    every tensor; with `read_values`, every tensor finite), and the output (a new directory on a writable
    disk with room for it, one layer's experts within the memory available)."""
    src = Path(dense_dir).expanduser()
    family = check_request(check_model_dir(src), src, request, min_experts)
    refuse_quantized(src, "upcycle")  # it copies the weights as they are: FP8 / MXFP4 ones are refused
    checked = check_checkpoint(src, read_values=read_values)
    check_tokenizer_file_fits(src, checked.embedding_rows)  # the MoE keeps the embedding and the tokenizer
    config = checked.config
    n_layers = int(config.num_hidden_layers)
    # the sizes as transformers reads them (a field config.json leaves out has its default, which the weights
    # were just checked against)
    dense = {**checked.raw, **{k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                "num_attention_heads", "intermediate_size")}}
    moe = moe_config(dense, family, request.experts, request.top_k, request.granularity, request.shared_expert)
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
    return UpcyclePlan(src, out, request, family, checked, moe, groups, need, max(shard_bytes))


def _output_bytes(checked: CheckedCheckpoint, key: str, layer: int | None, family: Family,
                  request: UpcycleRequest) -> int:
    """The bytes dense tensor `key` becomes in the MoE: itself, or its experts (and a shared expert)."""
    size = checked.tensor_bytes(key)
    prefix = f"model.layers.{layer}.mlp."
    if layer is None or not key.startswith(prefix) or key[len(prefix):].split(".")[0] not in _DENSE_FFN:
        return size
    g = request.granularity
    out = request.experts * size // g
    if family.moe == "qwen2_moe":
        out += size if request.shared_expert else size // g
    return out


def upcycle(dense_dir: str | Path, out_dir: str | Path, experts: int, top_k: int, method: Method = "copy",
            granularity: int = 1, shared_expert: bool = False, drop_ratio: float = 0.5, noise: float = 0.01,
            seed: int = 0, progress: bool = True, min_experts: int = 2) -> UpcycleResult:
    """Upcycle the dense checkpoint in `dense_dir` into an MoE checkpoint in `out_dir` (see the module doc).

    min_experts=1 allows a one-expert "MoE": the dense model itself in the MoE family's classes (the
    router of one expert weighs it 1), which `sdmoe train` can train on as the dense anchor."""
    request = UpcycleRequest(experts, top_k, method, granularity, shared_expert, drop_ratio, noise, seed)
    return write_upcycle(plan_upcycle(dense_dir, out_dir, request, min_experts), progress)


def write_upcycle(plan: UpcyclePlan, progress: bool = True) -> UpcycleResult:
    """Write what `plan_upcycle` checked: one shard a decoder layer, into a temp directory renamed to the
    output at the end (whole or nothing; SIGTERM and a full disk leave nothing behind)."""
    req, family, weights = plan.request, plan.family, plan.checked.weights
    d = int(plan.checked.config.hidden_size)
    std = float(plan.checked.raw.get("initializer_range", 0.02))
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
                    tensors.update(_convert(key, weights.get(key), layer, family, req.experts, req.granularity,
                                            req.method, req.shared_expert, req.drop_ratio, req.noise, gen, req.seed))
                if layer is not None:  # the router
                    tensors[f"model.layers.{layer}.{family.block}.gate.weight"] = (
                        torch.randn(req.experts, d, generator=gen) * std).to(tensors[next(iter(tensors))].dtype)
                total += sum(t.numel() for t in tensors.values())
                size += sum(t.numel() * t.element_size() for t in tensors.values())
                weight_map.update({k: name for k in tensors})
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / name), metadata={"format": "pt"})
                del tensors
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                                     indent=1), encoding="utf-8")
            for f in _KEPT_FILES:
                if (plan.src / f).is_file():
                    shutil.copyfile(plan.src / f, tmp / f)
    except Exception as e:  # safetensors and tokenizers raise their own types for a full or read-only disk
        if (why := write_failure(e)) is None:
            raise
        raise UserError(f"could not write the upcycled model to {plan.out} ({why}); nothing was kept: free space or "
                        "choose another --out") from None
    dense_n = sum(math.prod(weights.shape(k)) for k in weights.keys())
    return UpcycleResult(plan.out, family, req.experts, req.top_k, req.method, req.granularity, plan.layers, total,
                         dense_n)


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


def _convert(key: str, w: torch.Tensor, layer: int | None, family: Family, experts: int, granularity: int,
             method: str, shared_expert: bool, drop_ratio: float, noise: float, gen: torch.Generator,
             seed: int) -> dict[str, torch.Tensor]:
    """One dense tensor's place in the MoE checkpoint: itself (outside the FFN), or its experts."""
    prefix = f"model.layers.{layer}.mlp."
    if layer is None or not key.startswith(prefix) or key[len(prefix):].split(".")[0] not in _DENSE_FFN:
        return {key: w}
    proj = key[len(prefix):].split(".")[0]
    role = _DENSE_FFN.index(proj)
    block = f"model.layers.{layer}.{family.block}."
    out = {}
    segments = w.chunk(granularity, dim=1 if proj == "down_proj" else 0)
    for i in range(experts):
        e = segments[i % granularity].clone()
        if proj == "down_proj" and granularity > 1:
            e.mul_(granularity)  # the expected output of the top-k (renormalised) segments: the dense FFN's
        # drop: the same neurons of expert i in its gate, up and down (a generator of its own per layer and expert)
        neurons = torch.Generator().manual_seed(seed * 1_000_003 + layer * 4099 + i)
        e = _perturb(e, w, proj, method, drop_ratio, noise, gen, neurons)
        out[f"{block}experts.{i}.{family.names[role]}.weight"] = e
    if family.moe == "qwen2_moe":  # its shared expert: the whole FFN, or silent (zero output) at the start
        shared = w.clone() if shared_expert else segments[0].clone()
        if proj == "down_proj" and not shared_expert:
            shared.zero_()
        out[f"{block}shared_expert.{proj}.weight"] = shared
        if proj == "gate_proj":
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
    cfg = AutoConfig.for_model("qwen3", **fields, intermediate_size=moe["moe_intermediate_size"])
    with atomic_dir(out) as tmp:
        cfg.save_pretrained(tmp)
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        for f in _KEPT_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
    return out
