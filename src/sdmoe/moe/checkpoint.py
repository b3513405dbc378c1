"""Expert weights read lazily, layer by layer, from a local checkpoint directory.

Reads `config.json` and the safetensors file(s) of a transformers checkpoint
(`model.safetensors`, or the shards a `model.safetensors.index.json` names)
with `safetensors.safe_open` (memory-mapped), and hands out one MoE layer at a
time in the canonical shapes of `sdmoe.moe.layout`:

    gate_EFD, up_EFD : E x F x D      down_EDF : E x D x F      router_ED : E x D

Only one layer's experts are ever stacked in memory, so a checkpoint far
larger than RAM can be analysed. Which tensors are experts, and how each layout
keeps them, the layout adapters say (`sdmoe.moe.adapters`: the names on disk are
their names): fused `<block>.experts.gate_up_proj` / `down_proj` (plain or
transposed, Aria's `fc1/fc2`, Inkling 2's `w13_weight/w2_weight`, the JetMoE and
Granite MoE pair `input_linear/output_linear`), per-expert module lists
(`<block>.experts.<i>.gate_proj.weight`, Mixtral's `w1/w3/w2`: what `save_pretrained`
writes for most families) and DBRX's flat `<block>.experts.mlp.w1/v1/w2`, with the
router `<block>.gate.weight` (or `router.weight`, a nested router's weight).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdmoe.errors import UserError

from .adapters import LayoutAdapter, router_names, saved_layout, saved_suffixes
from .quantized import QuantizedTensors
from .stored import INDEX_FILE, SINGLE_FILE, StoredTensors

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
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
class _Layer:
    layer: int
    block: str  # the block's prefix, e.g. "model.layers.3.mlp"
    adapter: LayoutAdapter  # its experts, with tensor names for places
    router: str | None  # the router weight's name


class SafetensorsWeights(StoredTensors):
    """A checkpoint directory's safetensors tensors, memory-mapped: which file holds each name (the single
    file, an index's shards, or every *.safetensors), their shapes, and the tensors, with one-line errors
    for a missing shard, a damaged file or a tensor holding NaN."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._shapes: dict[str, tuple[int, ...]] = {}
        # FP8 / MXFP4 (`quantized`): `keys()` are the model's names, each dequantised when read (scales hidden);
        # `key_file` stays what the files hold
        self.quantized: QuantizedTensors | None = QuantizedTensors.find(self)

    def keys(self) -> list[str]:
        return list(self.quantized.name_file if self.quantized is not None else self.key_file)

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
        self._layers = self._find_layers()

    # -- structure ---------------------------------------------------------
    def _find_layers(self) -> list[_Layer]:
        """Every block whose tensors a layout adapter reads, with its router; the names are the adapters'."""
        keys = self.weights.keys()
        experts = saved_suffixes()
        blocks: dict[str, dict[str, str]] = {}  # block -> {name under the block: key}
        for key in sorted(keys):
            if m := experts.match(key):
                blocks.setdefault(m["block"], {})[m["suffix"]] = key
        have, routers = set(keys), router_names()
        out = []
        for block, names in blocks.items():
            router = next((f"{block}.{r}" for r in routers if f"{block}.{r}" in have), None)
            try:
                adapter = saved_layout(names, self._shape, self.config.get("model_type"),
                                       self._shape(router)[0] if router else None)
            except UserError as e:  # the adapter says what is wrong with the experts; here, where
                raise UserError(f"{block} in {self.path}: {e}") from None
            if adapter is not None:
                match = _LAYER_INDEX.search(f".{block}.")
                out.append(_Layer(int(match.group(1)) if match else 0, block, adapter, router))
        if not out:
            raise UserError(f"no MoE layers found in {self.path} ({self._unread(keys, blocks)}); sdmoe needs "
                            "`*.experts.gate_up_proj/down_proj`, `*.experts.<i>.gate_proj|up_proj|down_proj"
                            "(.w1|w3|w2).weight` or DBRX's `*.experts.mlp.w1/v1/w2` expert tensors")
        return sorted(out, key=lambda s: s.layer)

    def _unread(self, keys: list[str], blocks: dict[str, dict[str, str]]) -> str:
        """What the checkpoint holds instead of experts a layout reads: expert-named tensors of shapes no layout
        fits, or else a sample of its names."""
        if blocks:
            block, names = next(iter(blocks.items()))
            shapes = ", ".join(f"{n} {list(self._shape(k))}" for n, k in list(names.items())[:4])
            return f"the expert tensors of {block} ({shapes}) are no fused, stacked or per-expert gated MLP"
        sample = sorted({_LAYER_INDEX.sub(".N.", k) for k in keys})[:6]
        return f"tensor names look like {', '.join(sample)}"

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self._layers]

    @property
    def hidden_size(self) -> int:
        return self._layers[0].adapter.hidden_size

    @property
    def num_experts(self) -> int:
        return self._layers[0].adapter.num_experts

    @property
    def expert_ffn(self) -> int:
        return self._layers[0].adapter.expert_ffn

    @property
    def top_k(self) -> int | None:
        for name in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"):
            if isinstance(self.config.get(name), int):
                return self.config[name]
        return None

    # -- reading -----------------------------------------------------------
    def read_layer(self, layer: int, dtype: torch.dtype | None = None) -> LayerWeights:
        """One MoE layer's canonical weights.

        `dtype=None` keeps the disk dtype (views of the tensors read where the layout allows). With a
        `dtype`, each projection is one new contiguous tensor, hidden space last, converted while copied
        (module lists: expert by expert, into one buffer per projection, no second full-size copy), so
        `projections()["down"]` is contiguous.
        """
        spec = next((s for s in self._layers if s.layer == layer), None)
        if spec is None:
            raise UserError(f"layer {layer} holds no MoE block in {self.path}; MoE layers are {self.layers}")
        views = spec.adapter.views(self._get)[0] if dtype is None else spec.adapter.copies(self._get, dtype)
        router = self._get(spec.router) if spec.router else None
        if dtype is not None and router is not None:
            router = router.to(dtype)
        return LayerWeights(spec.layer, spec.block, views["gate"], views["up"], views["down"].transpose(1, 2), router)

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
