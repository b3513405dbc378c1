"""Writing quantised checkpoints the way the FP8 and MXFP4 releases are written, and reading them back by the
definition of each format (loops, no transformers): what `tests/moe/test_quantized.py` and
`benchmarks/bench_quantized.py` check sdmoe against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest float8_e4m3fn
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1 magnitudes; the 4th bit is the sign


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., R, C) -> float8_e4m3fn (..., R, C) and float32 scale_inv (..., ceil(R/bm), ceil(C/bn)): each block's
    largest magnitude maps to 448 (DeepSeek-V3's recipe); partial edge blocks where R, C are not multiples."""
    (bm, bn), (r, c), lead = block, w.shape[-2:], w.shape[:-2]
    gr, gc = -(-r // bm), -(-c // bn)
    tiles = F.pad(w.float(), (0, gc * bn - c, 0, gr * bm - r)).reshape(*lead, gr, bm, gc, bn)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*lead, gr * bm, gc * bn)[..., :r, :c].contiguous(), scale_inv.float().contiguous()


def dequantize_fp8_by_loop(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The definition: every block of q times its own scale."""
    (bm, bn), out = block, q.float().clone()
    for i in range(scale_inv.shape[-2]):
        for j in range(scale_inv.shape[-1]):
            out[..., i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] *= scale_inv[..., i, j, None, None]
    return out


def quantize_mxfp4(w_ECR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E, C, R) tensor as gpt-oss stores it: blocks uint8 (E, R, C/32, 16), low nibble first, and E8M0 scales
    (E, R, C/32): per block of 32 the exponent floor(log2(max|x|)) - 2, values rounded to the nearest e2m1 (|x| <= 6)."""
    x = w_ECR.float().transpose(1, 2)
    e, r, c = x.shape
    g = x.reshape(e, r, c // 32, 32)
    amax = g.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    v = g / torch.exp2(exp)[..., None]
    code = (v.abs().clamp(max=6)[..., None] - FP4).abs().argmin(-1) + 8 * (v < 0)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.to(torch.uint8).contiguous(), (exp + 127).to(torch.uint8).contiguous()


def dequantize_mxfp4_by_loop(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The definition: each nibble's e2m1 value (low nibble first) times 2**(scale - 127); (E, R, G, 16) -> (E, G*32, R)."""
    lut = torch.cat([FP4, -FP4])
    e, r, g, b = blocks.shape
    out = torch.empty(e, r, g, 2 * b)
    for k in range(b):
        out[..., 2 * k] = lut[(blocks[..., k] & 0xF).long()]
        out[..., 2 * k + 1] = lut[(blocks[..., k] >> 4).long()]
    out = out * torch.exp2(scales.float() - 127)[..., None]
    return out.reshape(e, r, g * 2 * b).transpose(1, 2).contiguous()


def _fp8_quantised(key: str, t: torch.Tensor) -> bool:
    """What the FP8 releases quantise: the 2-D weights of the decoder layers' linear maps and the experts, not the
    embeddings, LM head, norms, or the router (DeepSeek-V3 keeps `mlp.gate.weight` in bf16)."""
    return t.dim() >= 2 and ".layers." in key and key.endswith((".weight", "_proj")) and "norm" not in key \
        and not key.endswith((".gate.weight", ".router.weight", "shared_expert_gate.weight"))


def write_fp8(src: Path, dst: Path, block: tuple[int, int] = (128, 128), shards: int = 1) -> dict[str, torch.Tensor]:
    """`src` (a saved checkpoint) FP8 block-quantised into `dst`, `shards` files with an index; returns every tensor
    dequantised by the definition (what the quantised checkpoint means)."""
    from safetensors.torch import load_file

    tensors, meant = {}, {}
    for f in sorted(src.glob("*.safetensors")):
        for key, t in load_file(f).items():
            if _fp8_quantised(key, t):
                q, s = quantize_fp8(t, block)
                tensors[key], tensors[key + "_scale_inv"] = q, s
                meant[key] = dequantize_fp8_by_loop(q, s, block)
            else:
                tensors[key] = meant[key] = t
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    _write(dst, src, config, tensors, shards)
    return meant


def write_mxfp4(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """A saved gpt_oss checkpoint with its experts in MXFP4 (as openai/gpt-oss-* ships them) into `dst`; returns every
    tensor dequantised by the definition."""
    from safetensors.torch import load_file

    tensors, meant = {}, {}
    for f in sorted(src.glob("*.safetensors")):
        for key, t in load_file(f).items():
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(t)
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
                meant[key] = dequantize_mxfp4_by_loop(blocks, scales)
            else:
                tensors[key] = meant[key] = t
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write(dst, src, config, tensors, 1)
    return meant


def save_dequantised(meant: dict[str, torch.Tensor], src: Path, dst: Path) -> None:
    """The dequantised tensors saved in float32 under the same names, config.json without quantization_config."""
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    _write(dst, src, config, {k: v.float().contiguous() for k, v in meant.items()}, 1)


def _write(dst: Path, src: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():  # tokenizer and generation files travel with the weights
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
