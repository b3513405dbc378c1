"""Expert weights read lazily, layer by layer, from a local checkpoint directory.

Reads `config.json` and the safetensors file(s) of a transformers checkpoint
(`model.safetensors`, or the shards a `model.safetensors.index.json` names)
with `safetensors.safe_open` (memory-mapped), and hands out one MoE layer at a
time in the canonical shapes of `sdmoe.moe.layout`:

    gate_EFD, up_EFD : E x F x D      down_EDF : E x D x F      router_ED : E x D

Only one layer's experts are ever stacked in memory, so a checkpoint far
larger than RAM can be analysed. Recognised tensor names:

- fused (transformers 5 in memory): `<block>.experts.gate_up_proj` (E, 2F, D)
  [or transposed (E, D, 2F)] and `<block>.experts.down_proj` (E, D, F) [or (E, F, D)];
- per-expert module lists (what `save_pretrained` writes, transformers 4,
  remote-code models): `<block>.experts.<i>.{gate_proj,up_proj,down_proj}.weight`
  or Mixtral's `<block>.experts.<i>.{w1,w3,w2}.weight`;

with the router `<block>.gate.weight` (or `<block>.router.weight`) of shape (E, D).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdmoe.errors import UserError

from .layout import split_gate_up
from .projections import PROJECTIONS
from .quantized import QuantizedTensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_FUSED = re.compile(r"^(?P<block>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)$"
                    # Aria's (fc1, fc2), Inkling 2's (w13_weight, w2_weight); JetMoE's and Granite MoE's experts on
                    # the block itself (not JetMoE's attention experts nor Granite's `shared_mlp`, 2-D, named alike)
                    r"|^(?P<block2>.+)\.experts\.(?P<proj2>fc1\.weight|fc2\.weight|w13_weight|w2_weight)$"
                    r"|^(?P<block3>.+\.(?:mlp|block_sparse_moe))\.(?P<proj3>input_linear|output_linear)\.weight$")
# the saved name of a fused tensor -> the in-memory one it is
_FUSED_NAME = {"fc1.weight": "gate_up_proj", "w13_weight": "gate_up_proj", "input_linear": "gate_up_proj",
               "fc2.weight": "down_proj", "w2_weight": "down_proj", "output_linear": "down_proj"}
_LISTED = re.compile(r"^(?P<block>.+)\.experts\.(?P<i>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# canonical role of each per-expert projection name
_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
_ROUTER_NAMES = ("gate.weight", "router.weight", "router.gate.weight", "gate.wg.weight", "router.layer.weight",
                 "router.classifier.weight")
# Fused experts a model type stores transposed ((E, D, 2F), (E, F, D)) with gate and up interleaved
# [g0, u0, g1, ...] (transformers' `use_experts_implementation(is_transposed=True, is_concatenated=False)`):
# named by model type, since gpt-oss's D == F (2880) leaves the shapes ambiguous. model_type -> (transposed, interleaved)
_FUSED_STORAGE = {"gpt_oss": (True, True), "llama4": (True, False), "llama4_text": (True, False), "aria": (True, False),
                  "aria_text": (True, False), "inkling2_text": (False, True), "inkling2_loop_text": (False, True)}
# Files one of which a saved tokenizer always has (fast, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Where a transformers checkpoint can name Python modules of its own (`auto_map`).
CODE_MAP_FILES = ("config.json", "tokenizer_config.json")
# dtypes torch.isfinite handles on every backend (float8 kinds it may not)
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_json_object(file: Path) -> dict:
    """A checkpoint's JSON file as a dict, or a one-line error saying it is damaged."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror or e}); check its permissions") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a JSON object; re-download or re-save the checkpoint")
    return data


def no_config_error(path: Path) -> UserError:
    """The error for a directory without config.json: what it holds instead, and where the model is."""
    base = f"{path} has no config.json"
    if (path / "model" / "config.json").is_file():
        return UserError(f"{base} (the trained model is in its model/ subdirectory); pass {path / 'model'}")
    if (path / "state.json").is_file() and ((path / "optimizer.pt").is_file() or path.parent.name == "checkpoints"):
        # sdmoe's own training checkpoint: runs/x/checkpoints/step_NNNNNNN (weights under SD-MoE names, no config)
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        if run is not None and (run / "model" / "config.json").is_file():
            where = f"pass the run's final model, {run / 'model'}"
        elif run is not None:
            where = f"finish the run (sdmoe train --resume --out {run}) and pass its final model, {run / 'model'}"
        else:
            where = "pass the final model/ directory of the run it belongs to"
        return UserError(f"{base}: it is an sdmoe training checkpoint (state.json, optimizer.pt), not a saved "
                         f"model; {where}")
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        return UserError(f"{base}: it is an sdmoe run without a final model yet; finish it with "
                         f"`sdmoe train --resume --out {path}`, then pass {path / 'model'}")
    return UserError(f"{base}; pass a transformers checkpoint directory (save_pretrained output)")


def refuse_custom_code(path: Path, config: dict | None = None) -> None:
    """Raise if the checkpoint names Python modules of its own: sdmoe never runs a checkpoint's code.

    transformers imports the modules an `auto_map` names with trust_remote_code=True and, when
    the flag is left unset, ASKS on stdin (a `y` runs them). We pass trust_remote_code=False
    everywhere too, but refuse here first so the user learns why, before transformers reads anything.
    """
    for name in CODE_MAP_FILES:
        file = path / name
        if name == "config.json" and config is not None:
            data = config
        elif file.is_file():
            data = read_json_object(file)
        else:
            continue
        auto_map = data.get("auto_map")
        if not auto_map:
            continue
        if isinstance(auto_map, dict):
            entries = ", ".join(
                f"{k} -> {', '.join(str(x) for x in v if x) if isinstance(v, list) else v}" for k, v in auto_map.items()
            )
        else:
            entries = str(auto_map)
        raise UserError(
            f"{file} asks to run custom code (auto_map: {entries[:200]}); sdmoe never runs a checkpoint's code: "
            "pass a model of a type transformers ships (deleting auto_map from the file loads it with "
            "transformers' own classes), or use `sdmoe analyze --weights-only`, which reads only the weights"
        )


def check_model_dir(path: str | Path) -> dict:
    """Every check a loader of a user's checkpoint makes BEFORE transformers reads it; returns config.json.

    A directory (not a run, not a training checkpoint) with a valid config.json, no code of its
    own (`auto_map`), a model type this transformers version knows, and tokenizer files
    (transformers 5 builds an EMPTY tokenizer from config.json alone, which fails much later).
    """
    import transformers
    from transformers import CONFIG_MAPPING

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a model directory such as runs/demo/model")
    if not p.is_dir():
        raise UserError(f"{p} is not a directory; pass a model directory such as runs/demo/model")
    if not (p / "config.json").is_file():
        raise no_config_error(p)
    config = read_json_object(p / "config.json")
    refuse_custom_code(p, config)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{p / 'config.json'} names no model_type; re-save the model with save_pretrained")
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"{p / 'config.json'} has model_type {model_type!r}, which transformers {transformers.__version__} does "
            "not know; upgrade transformers (pip install -U transformers) or pass a model of a type it ships"
        )
    check_weight_files(p)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{p} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "save the tokenizer beside the model (tokenizer.save_pretrained)")
    return config


def regular_file(f: Path) -> None:
    """Refuse a special file (FIFO, device, socket) where a checkpoint's file should be: reading one
    would block, or never end."""
    import stat

    try:
        mode = f.stat().st_mode
    except OSError as e:
        raise UserError(f"cannot read {f} ({e.strerror}); check the checkpoint directory") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{f} is not a regular file (a FIFO, device or socket); put the file itself there")


def check_weight_files(p: Path) -> None:
    """Every weights file the checkpoint has (the single file, the index and the shards it names) is a
    regular file."""
    index = p / INDEX_FILE
    if index.exists() or index.is_symlink():
        regular_file(index)
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map; re-save the checkpoint")
        for name in sorted(set(map(str, weight_map.values()))):
            shard = p / name
            if shard.exists() or shard.is_symlink():  # a missing one: `SafetensorsWeights` names it
                regular_file(shard)
    for f in (p / SINGLE_FILE, p / "tokenizer.json"):
        if f.exists() or f.is_symlink():
            regular_file(f)


@dataclass
class LayerWeights:
    """Canonical expert and router weights of one MoE layer (detached tensors)."""

    layer: int  # decoder layer index
    name: str  # block prefix, e.g. "model.layers.3.mlp"
    gate_EFD: torch.Tensor
    up_EFD: torch.Tensor
    down_EDF: torch.Tensor
    router_ED: torch.Tensor | None

    @property
    def num_experts(self) -> int:
        return int(self.gate_EFD.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.gate_EFD.shape[2])

    @property
    def expert_ffn(self) -> int:
        return int(self.gate_EFD.shape[1])

    def projections(self) -> dict[str, torch.Tensor]:
        """All three projections with the hidden space LAST (down transposed): name -> E x F x D."""
        return {"gate": self.gate_EFD, "up": self.up_EFD, "down": self.down_EDF.transpose(1, 2)}


def weights_of_block(block) -> LayerWeights:
    """Detached canonical weights of a live `MoEBlock` (views where the layout allows)."""
    with torch.no_grad():
        return LayerWeights(
            block.layer,
            block.name,
            block.gate_EFD().detach(),
            block.up_EFD().detach(),
            block.down_EDF().detach(),
            block.router_ED().detach(),
        )


@dataclass
class _LayerSpec:
    layer: int
    block: str
    layout: str  # "fused" | "module_list"
    tensors: dict  # fused: {"gate_up_proj": key, "down_proj": key}; list: {role: {i: key}}
    router: str | None


class SafetensorsWeights:
    """A checkpoint directory's safetensors tensors, memory-mapped: which file holds each name (the single
    file, an index's shards, or every *.safetensors), their shapes, and the tensors, with one-line errors
    for a missing shard, a damaged file or a tensor holding NaN."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[Path, object] = {}
        self.key_file = self._index_keys()
        self._shapes: dict[str, tuple[int, ...]] = {}
        # FP8 / MXFP4 (`quantized`): `keys()` are the model's names, each dequantised when read (scales hidden);
        # `key_file` stays what the files hold
        self.quantized: QuantizedTensors | None = QuantizedTensors.find(self)

    def keys(self) -> list[str]:
        return list(self.quantized.name_file if self.quantized is not None else self.key_file)

    def _index_keys(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise UserError(
                    f"{index} is not a valid safetensors index (no weight_map); re-download the checkpoint"
                ) from None
            files = {name: self.path / name for name in set(weight_map.values())}
            missing = sorted(n for n, p in files.items() if not p.is_file())
            if missing:
                raise UserError(
                    f"{index.name} names {len(missing)} shard(s) missing from {self.path} (e.g. {missing[0]}); "
                    "download every shard of the checkpoint"
                )
            return {k: files[v] for k, v in weight_map.items()}
        if single.is_file():
            return {k: single for k in self._open(single).keys()}
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if others:  # unusual names, no index: read them all
            keys = {}
            for name in others:
                for k in self._open(self.path / name).keys():
                    keys[k] = self.path / name
            return keys
        bins = sorted(p.name for p in self.path.glob("*.bin"))
        hint = (
            f"it holds {bins[0]} (pickle); re-save it with save_pretrained(..., safe_serialization=True)"
            if bins
            else "download the model's *.safetensors files into it"
        )
        raise UserError(f"{self.path} holds no {SINGLE_FILE} or {INDEX_FILE}; {hint}")

    def _open(self, file: Path):
        from safetensors import SafetensorError, safe_open

        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise UserError(
                    f"file {file} is truncated or corrupt; re-download it (safetensors: {str(e).splitlines()[0]})"
                ) from None
            self._handles[file] = handle
        return handle

    def stored(self, key: str):
        """The safetensors slice of a tensor exactly as its file holds it (a quantised one's data or scales too)."""
        return self._open(self.key_file[key]).get_slice(key)

    def _dequantized(self, key: str) -> bool:
        return getattr(self, "quantized", None) is not None and key in self.quantized.parts

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            self._shapes[key] = (self.quantized.shape(key) if self._dequantized(key)
                                 else tuple(self._open(self.key_file[key]).get_slice(key).get_shape()))
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        file = (self.quantized.name_file if self._dequantized(key) else self.key_file)[key]
        try:
            t = self.quantized.get(key) if self._dequantized(key) else self._open(file).get_tensor(key)
        except SafetensorError as e:
            raise UserError(f"file {file} is truncated or corrupt; re-download it (safetensors: {e})") from None
        # A NaN would surface much later as a failed eigendecomposition; name the tensor now (a dequantised one's
        # stored bytes were checked, more cheaply, by `quantized`)
        if t.dtype in _CHECKED_DTYPES and not self._dequantized(key) and not torch.isfinite(t).all():
            raise UserError(
                f"tensor {key} in {file} holds NaN or infinite values; the run that wrote it diverged or the file "
                "is damaged: analyse an earlier checkpoint or re-download it"
            )
        return t

    def get_part(self, key: str, start: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The block of tensor `key` at offset `start` of size `shape`, read from disk alone (a shard of it)."""
        from safetensors import SafetensorError

        if self._dequantized(key):
            return self.quantized.get_part(key, start, shape)
        file = self.key_file[key]
        region = tuple(slice(o, o + n) for o, n in zip(start, shape))
        try:
            return self._open(file).get_slice(key)[region] if region else self._open(file).get_tensor(key)
        except SafetensorError as e:
            raise UserError(f"file {file} is truncated or corrupt; re-download it (safetensors: {e})") from None

    def close(self) -> None:
        self._handles.clear()


class ExpertCheckpoint:
    """A local checkpoint directory, opened for layer-by-layer expert reading.

    >>> ckpt = ExpertCheckpoint("path/to/model")
    >>> ckpt.layers                        # MoE layer indices
    >>> for lw in ckpt.iter_layers():      # LayerWeights, one layer in memory at a time
    ...     lw.projections()
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise UserError(f"checkpoint path {self.path} does not exist; pass a local checkpoint directory")
        if not self.path.is_dir():
            raise UserError(
                f"checkpoint path {self.path} is not a directory; pass the folder that holds config.json "
                "and model.safetensors (as written by save_pretrained)"
            )
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise no_config_error(self.path)
        # Read as JSON only: no transformers call, so a checkpoint's own code (auto_map) never runs here.
        self.config: dict = read_json_object(cfg_path)
        check_weight_files(self.path)  # a FIFO where a weights file should be: one line, never a blocked read
        self.weights = SafetensorsWeights(self.path)
        self._shape, self._get = self.weights.shape, self.weights.get
        self._specs = self._find_layers()

    # -- files -------------------------------------------------------------
    # -- structure ---------------------------------------------------------
    def _find_layers(self) -> list[_LayerSpec]:
        keys = set(self.weights.keys())
        specs: dict[str, _LayerSpec] = {}
        for key in sorted(keys):
            m = _FUSED.match(key)
            if m:
                block, proj = (next(g for g in m.groups()[i::2] if g) for i in (0, 1))  # whichever alternative
                spec = specs.setdefault(block, _LayerSpec(0, block, "fused", {}, None))
                spec.tensors[_FUSED_NAME.get(proj, proj)] = key
                continue
            m = _LISTED.match(key)
            if m:
                spec = specs.setdefault(m["block"], _LayerSpec(0, m["block"], "module_list", {}, None))
                spec.tensors.setdefault(_ROLE[m["proj"]], {})[int(m["i"])] = key
        out = []
        for block, spec in specs.items():
            if spec.layout == "fused" and set(spec.tensors) != {"gate_up_proj", "down_proj"}:
                continue
            if spec.layout == "module_list":
                roles = spec.tensors
                if set(roles) != set(PROJECTIONS):
                    continue
                ids = set(roles["gate"])
                if ids != set(roles["up"]) or ids != set(roles["down"]) or ids != set(range(len(ids))):
                    raise UserError(
                        f"experts of {block} are incomplete in {self.path} (expert ids {sorted(ids)[:8]}...); "
                        "re-download the checkpoint"
                    )
            spec.router = next((f"{block}.{r}" for r in _ROUTER_NAMES if f"{block}.{r}" in keys), None)
            match = _LAYER_INDEX.search(f".{block}.")
            spec.layer = int(match.group(1)) if match else 0
            out.append(spec)
        if not out:
            sample = sorted({_LAYER_INDEX.sub(".N.", k) for k in keys})[:6]
            raise UserError(
                f"no MoE layers found in {self.path} (tensor names look like {', '.join(sample)}); "
                "sdmoe needs `*.experts.gate_up_proj/down_proj` or `*.experts.<i>.gate_proj|up_proj|down_proj"
                "(.w1|w3|w2).weight` expert tensors"
            )
        return sorted(out, key=lambda s: s.layer)

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self._specs]

    @property
    def hidden_size(self) -> int:
        spec = self._specs[0]
        if spec.layout == "module_list":
            return self._shape(spec.tensors["gate"][0])[1]
        return int(self.config.get("hidden_size") or self._guess_fused_d(spec))

    @property
    def num_experts(self) -> int:
        spec = self._specs[0]
        if spec.layout == "module_list":
            return len(spec.tensors["gate"])
        return self._shape(spec.tensors["gate_up_proj"])[0]

    @property
    def expert_ffn(self) -> int:
        spec = self._specs[0]
        if spec.layout == "module_list":
            return self._shape(spec.tensors["gate"][0])[0]
        _, a, b = self._shape(spec.tensors["gate_up_proj"])
        return (a if b == self.hidden_size else b) // 2

    @property
    def top_k(self) -> int | None:
        for name in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"):
            if isinstance(self.config.get(name), int):
                return self.config[name]
        return None

    def _guess_fused_d(self, spec: _LayerSpec) -> int:
        # down_proj (E, D, F): D is the dim shared with gate_up_proj that is not 2F
        _, a, b = self._shape(spec.tensors["down_proj"])
        _, c, _ = self._shape(spec.tensors["gate_up_proj"])
        return a if c == 2 * b else b

    # -- reading -----------------------------------------------------------
    def read_layer(self, layer: int, dtype: torch.dtype | None = None) -> LayerWeights:
        """One MoE layer's canonical weights.

        `dtype=None` keeps the disk dtype. With a `dtype`, each expert tensor
        is converted while being copied into one preallocated buffer per
        projection (no second full-size copy), and the down projection is
        stored hidden-last, so `projections()["down"]` is contiguous.
        """
        spec = next((s for s in self._specs if s.layer == layer), None)
        if spec is None:
            raise UserError(f"layer {layer} holds no MoE block in {self.path}; MoE layers are {self.layers}")
        if spec.layout == "fused":
            gate_up, down = self._get(spec.tensors["gate_up_proj"]), self._get(spec.tensors["down_proj"])
            d = int(self.config.get("hidden_size") or self._guess_fused_d(spec))
            transposed, interleaved = _FUSED_STORAGE.get(self.config.get("model_type"), (None, False))
            if transposed or (transposed is None and gate_up.shape[2] != d and gate_up.shape[1] == d):  # (E, D, 2F)
                gate_up = gate_up.transpose(1, 2)
            if transposed or (transposed is None and down.shape[1] != d and down.shape[2] == d):  # (E, F, D)
                down = down.transpose(1, 2)
            gate, up = split_gate_up(gate_up, interleaved)  # [gate; up] unless the model type interleaves them
            if dtype is not None:
                # one copy each, straight into contiguous storage (`.to` alone keeps a transposed view's strides,
                # and `.contiguous()` would copy it a second time)
                gate, up = (t.to(dtype, memory_format=torch.contiguous_format) for t in (gate, up))
                down = down.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).transpose(1, 2)
        elif dtype is None:
            e = len(spec.tensors["gate"])
            gate, up, down = (
                torch.stack([self._get(spec.tensors[role][i]) for i in range(e)]) for role in PROJECTIONS
            )
        else:
            e = len(spec.tensors["gate"])
            f, d = self._shape(spec.tensors["gate"][0])
            gate, up, down_T = (torch.empty(e, f, d, dtype=dtype) for _ in range(3))
            for i in range(e):
                gate[i].copy_(self._get(spec.tensors["gate"][i]))
                up[i].copy_(self._get(spec.tensors["up"][i]))
                down_T[i].copy_(self._get(spec.tensors["down"][i]).T)
            down = down_T.transpose(1, 2)  # canonical (E, D, F) view of hidden-last storage
        router = self._get(spec.router) if spec.router else None
        if dtype is not None and router is not None:
            router = router.to(dtype)
        return LayerWeights(spec.layer, spec.block, gate, up, down, router)

    def iter_layers(self, layers: list[int] | None = None, dtype: torch.dtype | None = None) -> Iterator[LayerWeights]:
        """Every (or the listed) MoE layer in order, one at a time."""
        if layers is not None:
            missing = sorted(set(layers) - set(self.layers))
            if missing:
                raise UserError(f"layers {missing} hold no MoE block in {self.path}; MoE layers are {self.layers}")
        for layer in self.layers:
            if layers is None or layer in layers:
                yield self.read_layer(layer, dtype)

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> "ExpertCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_expert_layers(
    path: str | Path, layers: list[int] | None = None, dtype: torch.dtype | None = None
) -> Iterator[LayerWeights]:
    """Shortcut: `ExpertCheckpoint(path).iter_layers(layers, dtype)`."""
    with ExpertCheckpoint(path) as ckpt:
        yield from ckpt.iter_layers(layers, dtype)


class ModelTensors:
    """A checkpoint's tensors under the model's in-memory names, read part by part.

    `save_pretrained` writes fused experts back under their per-expert names (transformers' conversion
    mapping for the model type, reversed: `mlp.experts.<i>.gate_proj.weight`, Mixtral's
    `block_sparse_moe.experts.<i>.w1.weight`, ...). Here that mapping is applied the loading way, from
    transformers itself (`get_checkpoint_conversion_mapping`): its renames, and its merges (experts stacked on
    dim 0, the listed projections concatenated on dim 1), so `get_part` of a fused name reads only the rows
    of the experts asked for, never the whole layer."""

    def __init__(self, weights: SafetensorsWeights, model_type: str | None):
        self.weights = weights
        self.merged: dict[str, list[dict[int, str]]] = {}  # fused name -> per source pattern: {expert: key}
        renames, merges = _conversion_rules(model_type)
        self.plain: dict[str, str] = {}  # in-memory name -> saved key
        for key in weights.keys():
            name = key
            for pattern, target in renames:
                name = pattern.sub(target, name)
            for pattern, target, n_sources, k in merges:
                m = pattern.search(name)
                if m:
                    fused = name[: m.start()] + target + name[m.end():]
                    self.merged.setdefault(fused, [{} for _ in range(n_sources)])[k][int(m["i"])] = key
                    break
            else:
                self.plain[name] = key
        for fused, sources in self.merged.items():
            ids = [sorted(s) for s in sources]
            if any(i != list(range(len(ids[0]))) for i in ids) or not ids[0]:
                raise UserError(f"the experts of {fused} are incomplete in {weights.path} (expert ids "
                                f"{ids[0][:8]}...); re-download or re-save the checkpoint")

    def names(self) -> set[str]:
        return set(self.plain) | set(self.merged)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.plain:
            return self.weights.shape(self.plain[name])
        per_source = []
        for source in self.merged[name]:
            shapes = {self.weights.shape(key) for key in source.values()}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise UserError(f"the experts of {name} in {self.weights.path} differ in shape "
                                f"({sorted(shapes)[:3]}); the checkpoint is damaged: re-save it")
            per_source.append(shapes.pop())
        if len({cols for _, cols in per_source}) != 1:
            raise UserError(f"the projections merged into {name} in {self.weights.path} differ in width "
                            f"({per_source}); the checkpoint is damaged: re-save it")
        return (len(self.merged[name][0]), sum(rows for rows, _ in per_source), per_source[0][1])

    def get_part(self, name: str, start: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        if name in self.plain:
            return self.weights.get_part(self.plain[name], start, shape)
        (e0, r0, c0), (ne, nr, nc) = start, shape
        sources, experts = self.merged[name], []
        for e in range(e0, e0 + ne):
            rows, offset = [], 0
            for source in sources:
                height = self.weights.shape(source[e])[0]
                lo, hi = max(r0, offset), min(r0 + nr, offset + height)
                if hi > lo:
                    rows.append(self.weights.get_part(source[e], (lo - offset, c0), (hi - lo, nc)))
                offset += height
            experts.append(torch.cat(rows))
        if not experts:  # an empty shard: only the dtype is read
            dtype = self.weights.get_part(sources[0][0], (0, 0), (0, 0)).dtype
            return torch.empty(shape, dtype=dtype)
        return torch.stack(experts)


def _conversion_rules(model_type: str | None) -> tuple[list, list]:
    """transformers' load-time conversion for `model_type`: renames [(regex, target)] and expert merges
    [(regex with the expert id as group `i`, fused target, number of sources, this source's index)].
    Only the merge our fused experts use (MergeModulelist on dim 0, then Concatenate on dim 1) is taken."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    renames, merges = [], []
    for rule in (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []:
        sources, targets = rule.source_patterns, rule.target_patterns
        if isinstance(rule, WeightRenaming) and len(sources) == len(targets) == 1:
            renames.append((re.compile(sources[0]), targets[0]))
        elif isinstance(rule, WeightConverter) and len(targets) == 1:
            ops = [(type(op).__name__, getattr(op, "dim", None)) for op in rule.operations]
            if ops in ([("MergeModulelist", 0), ("Concatenate", 1)], [("MergeModulelist", 0)]):
                for k, source in enumerate(sources):
                    pattern = re.compile(re.escape(source).replace(r"\*", r"(?P<i>\d+)") + "$")
                    merges.append((pattern, targets[0], len(sources), k))
    return renames, merges
