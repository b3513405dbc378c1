"""Quantised checkpoints read as full-precision tensors, one tensor at a time.

The largest open MoEs are downloaded quantised; config.json's `quantization_config.quant_method`
names the format, the tensor names say which tensors it covers:

- `fp8` (DeepSeek-V3/R1, Kimi K2, the Qwen3 FP8 releases): a float8_e4m3fn `<name>` and a float32
  `<name>_scale_inv` (R/bm x C/bn, rounded up: the edge blocks may be partial) with one scale per
  `weight_block_size` block (bm x bn, 128 x 128); the value is `fp8 * scale_inv`. Static activation
  scales (`*.input_scale`, `*.activation_scale`) are not weights and are not read.
- `mxfp4` (gpt-oss): `<name>_blocks` uint8 (E, R, C/32, 16), fp4 e2m1 values two per byte (low
  nibble first), and `<name>_scales` uint8 (E, R, C/32), an E8M0 exponent (2**(s - 127)) per block
  of 32. Read as `<name>` of shape (E, C, R): the layout transformers' gpt-oss experts hold
  (gate_up_proj (E, D, 2F), down_proj (E, F, D)), so the names and shapes are those of the same
  model saved unquantised.

`QuantizedTensors` is how `SafetensorsWeights` (sdmoe.moe.checkpoint) shows such a checkpoint to
every reader (`analyze --weights-only`, `ModelTensors`, upcycle): the model's names only (scales
hidden), each dequantised when read: FP8 to float32, MXFP4 to bfloat16 (exact: a 2-bit significand
times a power of two). Memory stays one tensor's worth; an MXFP4 tensor is dequantised one expert
at a time. `dequantizing_loader` feeds the same tensors to transformers' loader, so
`train --init` and a full `analyze` load the model dequantised (see there why not transformers' own
`dequantize=True`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdmoe.errors import UserError

from .stored import StoredTensors

FP8, MXFP4 = "fp8", "mxfp4"
METHODS = (FP8, MXFP4)
SCALE_INV = "_scale_inv"
BLOCKS, SCALES = "_blocks", "_scales"
MX_BLOCK = 32  # values per MXFP4 scale
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the FP8 weight dtypes
_ACTIVATION_SCALES = (".input_scale", ".activation_scale")
_FIX = "download its bf16 release, or dequantise it first with transformers and save_pretrained"


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantisation: `fp8` with a (rows, cols) block (None: one scale per tensor) or `mxfp4`."""

    method: str
    block: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.block[0]}x{self.block[1]} blocks" if self.block else self.method


def scheme_of(config: dict, where: Path) -> Scheme | None:
    """The scheme config.json's `quantization_config` names (None: not quantised); one line for one we cannot read."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    field = f"{where / 'config.json'}'s quantization_config"
    if not isinstance(qc, dict):
        raise UserError(f"{field} is not a JSON object; restore config.json from the original download")
    method = qc.get("quant_method")
    if method == MXFP4:
        return Scheme(MXFP4)
    if method != FP8:
        raise UserError(f"{field} has quant_method {method!r}, a format sdmoe does not read (it reads fp8 with block "
                        f"scales and mxfp4); {_FIX}")
    block = qc.get("weight_block_size")
    if block is None:
        return Scheme(FP8)
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UserError(f"{field} has weight_block_size {block!r}, not two positive integers such as [128, 128]; "
                        "restore config.json from the original download")
    return Scheme(FP8, (block[0], block[1]))


def _read_config(path: Path) -> dict:
    # A missing or damaged config.json is reported by whoever needs it (ExpertCheckpoint, check_model_dir);
    # here it only means "no quantization_config".
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


# -- one tensor -------------------------------------------------------------------------------------
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """An FP8 tensor (..., R, C) times its per-block `scale_inv` (..., ceil(R/bm), ceil(C/bn)), in float32.

    transformers' `_dequantize_fp8_weight` (the one its FP8 backward uses) takes the block size and crops
    the partial edge blocks. Not its `Fp8Dequantize` (what `FineGrainedFP8Config(dequantize=True)` runs):
    that derives the block from the grid (R // grid rows), which for a 200-row weight in 128-row blocks
    (a 2-row grid) uses 100-row blocks, and raises for 576 rows (DeepSeek-V3's kv_a_proj_with_mqa)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    if scale_inv.dtype == torch.uint8:  # UE8M0 exponents stored as raw bytes: 2**(byte - 127)
        scale_inv = torch.exp2(scale_inv.to(torch.float32) - 127)
    return _dequantize_fp8_weight(weight, scale_inv.to(torch.float32), list(block) if block else None, torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 `blocks` (E, R, G, 16) and `scales` (E, R, G) as one (E, G*32, R) tensor: a transposed view of
    (E, R, G*32) storage, dequantised an expert at a time.

    transformers' own `convert_moe_packed_tensors` (what `Mxfp4Config(dequantize=True)` runs: plain torch, no
    triton), called per expert so that its temporaries (int32 indices) are one expert's, not the layer's. Its
    last step transposes dims 1 and 2 into a contiguous copy (a third of its time, which the reader would
    undo: it wants gate_up as (E, 2F, D)); given one expert as (1, 1, R, G, 16), those dims are (1, R), the
    copy is a no-op, and the values come back in the stored (R, G*32) order."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    e, r, g, b = blocks.shape
    out = torch.empty(e, r, g * b * 2, dtype=dtype)
    for i in range(e):
        out[i] = convert_moe_packed_tensors(blocks[i][None, None], scales[i][None, None], dtype=dtype)[0, :, 0]
    return out.transpose(1, 2)


def dequantize(scheme: Scheme, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One stored tensor and its scales, dequantised (FP8: float32; MXFP4: bfloat16)."""
    if scheme.method == FP8:
        return dequantize_fp8(data, scale, scheme.block)
    return dequantize_mxfp4(data, scale)


# -- a checkpoint's tensors ----------------------------------------------------------------------------
class QuantizedTensors:
    """A quantised checkpoint's tensors under its model's names: `name_file` (name -> the file of its data,
    scales left out), `parts` (quantised name -> (data key, scale key)), their shapes, and the tensors
    dequantised. `stored_file` is what the files hold (key -> file), `stored(key)` the safetensors slice of
    one of those tensors exactly as its file holds it."""

    def __init__(self, scheme: Scheme, stored_files: dict[str, Path], stored, where: Path):
        self.scheme, self.stored_file, self._stored, self.where = scheme, stored_files, stored, where
        self.name_file: dict[str, Path] = {}
        self.parts: dict[str, tuple[str, str]] = {}
        self._dtype = {k: self._stored(k).get_dtype() for k in stored_files}
        if scheme.method == FP8:
            self._find_fp8()
        else:
            self._find_mxfp4()

    @classmethod
    def find(cls, weights: StoredTensors) -> QuantizedTensors | None:
        """The quantised view of a checkpoint's stored tensors (None for an unquantised checkpoint)."""
        scheme = scheme_of(_read_config(weights.path), weights.path)
        if scheme is None:
            marked = next((k for k in weights.key_file if k.endswith((SCALE_INV, BLOCKS))), None)
            if marked is not None:
                raise UserError(f"{weights.path} holds quantised tensors ({marked}) but its config.json names no "
                                "quantization_config; restore config.json from the original download")
            return None
        return cls(scheme, weights.key_file, weights.stored, weights.path)

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._stored(key).get_shape())

    def _damaged(self, what: str) -> UserError:
        return UserError(f"{what} in {self.where} ({self.scheme}); the checkpoint is damaged or incomplete: download "
                         "every shard (and model.safetensors.index.json) again")

    def _find_fp8(self) -> None:
        bm, bn = self.scheme.block or (None, None)
        for key, file in self.stored_file.items():
            if key.endswith(_ACTIVATION_SCALES):
                continue
            if key.endswith(SCALE_INV):
                base = key[: -len(SCALE_INV)]
                if base not in self.stored_file:
                    raise self._damaged(f"scale tensor {key} has no tensor {base}")
                if self._dtype[base] not in _FP8_DTYPES:
                    raise self._damaged(f"tensor {base} is {self._dtype[base]}, not FP8, yet has a scale {key}")
                continue
            self.name_file[key] = file
            if self._dtype[key] not in _FP8_DTYPES:
                continue
            scale = key + SCALE_INV
            if scale not in self.stored_file:
                raise self._damaged(f"FP8 tensor {key} has no scale tensor {scale}")
            shape, got = self._shape(key), self._shape(scale)
            if bm is None:
                want = "one value"
                ok = math.prod(got) == 1
            else:
                want = list(shape[:-2]) + [-(-shape[-2] // bm), -(-shape[-1] // bn)] if len(shape) >= 2 else None
                ok = want is not None and list(got) == want
            if not ok:
                raise self._damaged(f"scale tensor {scale} has shape {list(got)}, but {key} {list(shape)} needs {want}")
            self.parts[key] = (key, scale)

    def _find_mxfp4(self) -> None:
        for key, file in self.stored_file.items():
            if key.endswith(SCALES) and key[: -len(SCALES)] + BLOCKS in self.stored_file:
                continue
            if not key.endswith(BLOCKS):
                if key.endswith(SCALES) and self._dtype[key] == "U8":
                    raise self._damaged(f"MXFP4 scales {key} have no blocks {key[: -len(SCALES)]}{BLOCKS}")
                self.name_file[key] = file
                continue
            base = key[: -len(BLOCKS)]
            scale = base + SCALES
            if scale not in self.stored_file:
                raise self._damaged(f"MXFP4 tensor {key} has no scale tensor {scale}")
            shape, got = self._shape(key), self._shape(scale)
            if len(shape) != 4 or shape[-1] * 2 != MX_BLOCK or self._dtype[key] != "U8":
                raise self._damaged(f"MXFP4 tensor {key} is {self._dtype[key]} {list(shape)}, not uint8 "
                                    f"(experts, rows, blocks, {MX_BLOCK // 2})")
            if got != shape[:-1]:
                raise self._damaged(f"scale tensor {scale} has shape {list(got)}, but {key} {list(shape)} needs "
                                    f"{list(shape[:-1])}")
            self.name_file[base] = file
            self.parts[base] = (key, scale)

    # -- reading -------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """A quantised tensor's shape once dequantised."""
        data = self._shape(self.parts[name][0])
        if self.scheme.method == FP8:
            return data
        e, r, g, b = data
        return (e, g * b * 2, r)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if self.scheme.method == FP8 else torch.bfloat16

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, dequantised."""
        return self.get_part(name, (0,) * len(self.shape(name)), self.shape(name))

    def get_part(self, name: str, start: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The block of the dequantised tensor at `start` of size `shape`; reads only the stored blocks it covers."""
        from safetensors import SafetensorError

        data_key, scale_key = self.parts[name]
        if 0 in shape:  # an empty shard (FSDP2 on more ranks than rows): nothing to read
            return torch.empty(shape, dtype=self.dtype(name))
        try:
            if self.scheme.method == FP8:
                return self._fp8_part(data_key, scale_key, start, shape)
            return self._mxfp4_part(data_key, scale_key, start, shape)
        except SafetensorError as e:
            file = self.stored_file[data_key]
            raise UserError(f"file {file} is truncated or corrupt; re-download it (safetensors: {e})") from None

    def _fp8_part(self, data_key, scale_key, start, shape) -> torch.Tensor:
        if self.scheme.block is None:  # one scale: the region itself, times it
            region = tuple(slice(o, o + n) for o, n in zip(start, shape))
            return self._checked(data_key, self._stored(data_key)[region], self._stored(scale_key)[...].reshape(()))
        # the leading dims (experts) as asked; the last two widened to whole blocks, dequantised, cropped
        (bm, bn), full = self.scheme.block, self._shape(data_key)
        lead = tuple(slice(o, o + n) for o, n in zip(start[:-2], shape[:-2]))
        grid, data, crop = [], [], []
        for o, n, b, size in zip(start[-2:], shape[-2:], (bm, bn), full[-2:]):
            g0, g1 = o // b, -(-(o + n) // b)
            grid.append(slice(g0, g1))
            data.append(slice(g0 * b, min(g1 * b, size)))
            crop.append(slice(o - g0 * b, o - g0 * b + n))
        part = self._checked(data_key, self._stored(data_key)[(*lead, *data)], self._stored(scale_key)[(*lead, *grid)])
        return part[(..., *crop)]

    def _mxfp4_part(self, data_key, scale_key, start, shape) -> torch.Tensor:
        # logical (E, C, R) is stored as blocks (E, R, C/32, 16): C widened to whole blocks of 32, then cropped
        (e0, c0, r0), (ne, nc, nr) = start, shape
        g0, g1 = c0 // MX_BLOCK, -(-(c0 + nc) // MX_BLOCK)
        region = (slice(e0, e0 + ne), slice(r0, r0 + nr), slice(g0, g1))
        part = self._checked(data_key, self._stored(data_key)[region], self._stored(scale_key)[region])
        return part[:, c0 - g0 * MX_BLOCK : c0 - g0 * MX_BLOCK + nc, :]

    def _checked(self, data_key: str, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`data` and `scale` dequantised, once the stored bytes are known to hold no NaN or infinity. Checked here
        rather than by `isfinite` over the float32 result, the reader's check, which measured 2.5x slower than this
        pass over the bytes and would be the largest cost of reading an FP8 checkpoint."""
        if scale.dtype == torch.uint8:  # E8M0 exponents: 0xFF is NaN
            bad = bool((scale == 0xFF).any())
        else:  # a scale so large that the format's largest value times it overflows is no better
            top = torch.finfo(data.dtype).max if data.dtype.is_floating_point else 6.0
            bad = not bool(torch.isfinite(scale.to(torch.float32) * top).all())
        # e4m3fn has no infinity and its NaN is S.1111.111; e5m2's exponent 11111 is an infinity or NaN
        mask = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}.get(data.dtype)
        if not bad and mask is not None and data.numel():
            bad = int((data.view(torch.uint8) & mask).max()) == mask
        if bad:
            raise UserError(f"tensor {data_key} in {self.stored_file[data_key]} (or its scales) holds NaN or infinite "
                            "values; the file is damaged: re-download it")
        return dequantize(self.scheme, data, scale)


# -- transformers' loader ------------------------------------------------------------------------------
class _Dequantized:
    """A quantised tensor as transformers' loader takes a safetensors slice: read and dequantised when indexed
    (`tensor[...]`), so the loader holds the same one-tensor-at-a-time pipeline it runs on a plain checkpoint."""

    def __init__(self, tensors: QuantizedTensors, name: str):
        self.tensors, self.name = tensors, name
        self.shape = torch.Size(tensors.shape(name))
        self.dtype = tensors.dtype(name)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensors.get(self.name)[index].contiguous()  # MXFP4 comes as a transposed view


def dequantizing_loader(path: Path):
    """For a checkpoint config.json says is quantised, a stand-in for `AutoModelForCausalLM.from_pretrained(path,
    **kwargs)` that loads it dequantised: transformers' own loader (its renames, expert merges, dtype, load
    report) given the config without `quantization_config` (no quantised modules are built, and a model
    saved later is saved plain) and a state dict of our dequantising slices. None for a plain checkpoint.

    Not transformers' `FineGrainedFP8Config(dequantize=True)`: its `Fp8Dequantize` gets partial edge blocks
    wrong (see `dequantize_fp8`), and its FP8 quantizer needs accelerate, which sdmoe does not require."""
    if scheme_of(_read_config(path), path) is None:
        return None
    files = StoredTensors(path)
    q = QuantizedTensors.find(files)  # here, so a missing or misshapen scale is one line before any load

    def load(path: Path, trust_remote_code: bool = False, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        del config.quantization_config
        state = {k: _Dequantized(q, k) if k in q.parts else files.stored(k) for k in q.name_file}
        # from_pretrained(None, state_dict=...) is the concrete class's; the Auto class wants a path
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        return model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)

    return load


def refuse_quantized(path: str | Path, command: str) -> None:
    """One line for a command that copies full-precision weights as they are (upcycle) given a quantised checkpoint.

    The fix it names is our own whole-model load (`load_pretrained_model`, through `dequantizing_loader`), not
    transformers' `dequantize=True`, which gets FP8's partial edge blocks wrong."""
    path = Path(path).expanduser()
    scheme = scheme_of(_read_config(path), path)
    if scheme is not None:
        raise UserError(f"{path} stores its weights quantised ({scheme}, config.json's quantization_config) and "
                        f"{command} copies full-precision weights; download its bf16 release, or dequantise it first: "
                        "sdmoe.models.pretrained.load_pretrained_model(PATH, torch.bfloat16).save_pretrained(OUT), "
                        "then copy its tokenizer files into OUT")
