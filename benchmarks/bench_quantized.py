"""Time and peak memory of `sdmoe analyze --weights-only` on quantised checkpoints against the same weights in bf16.

    .venv/bin/python benchmarks/bench_quantized.py                   # both formats, 2 layers each (~7 GB of disk)
    .venv/bin/python benchmarks/bench_quantized.py --quick           # 1 layer each
    .venv/bin/python benchmarks/bench_quantized.py --format fp8 --layers 4 --repeat 3 --keep /tmp/q

Shapes (realistic, feasible on a 24 GiB, 2-core machine; the full models would be 60-600 GB):
- fp8: Qwen3-30B-A3B's MoE layers (Qwen/Qwen3-30B-A3B-FP8): D=2048, expert ffn F=768, E=128 experts, per-expert
  tensor names, float8_e4m3fn weights with 128 x 128 block `weight_scale_inv`, the router in bf16;
- mxfp4: gpt-oss-20b's (openai/gpt-oss-20b): D=F=2880, E=32 experts, fused `gate_up_proj_blocks/_scales`
  (E, 2F, D/32, 16) and `down_proj_blocks/_scales`, gate and up interleaved.

The weights are random with a planted common subspace (as bench_analysis.py), written once in bf16 and once
quantised from those bf16 values, one shard per layer, in a child process. Each checkpoint is then analysed by
the CLI in a fresh process, whose wall time and peak resident set (getrusage of that child: the memory-mapped
file pages it touched included) are printed, with the quantised / bf16 ratios measured in this run and the
largest difference of the findings (mean overlap, quantised against bf16: the quantisation's own effect).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# (D, F, E, top-k, model_type) of the two releases
SHAPES = {"fp8": (2048, 768, 128, 8, "qwen3_moe"), "mxfp4": (2880, 2880, 32, 4, "gpt_oss")}
FP8_MAX = 448.0
FP4_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between e2m1's 0, .5, 1, 1.5, 2, 3, 4, 6


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C), multiples of 128 -> float8_e4m3fn and the (R/128, C/128) float32 scale_inv (block max -> 448)."""
    r, c = w.shape
    tiles = w.float().reshape(r // 128, 128, c // 128, 128)
    scale_inv = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(r, c).contiguous(), scale_inv.contiguous()


def quantize_mxfp4(w_CR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (C, R) -> blocks uint8 (R, C/32, 16), low nibble first, and E8M0 scales (R, C/32)."""
    x = w_CR.float().T.reshape(w_CR.shape[1], -1, 32)
    exp = (torch.floor(torch.log2(x.abs().amax(-1).clamp(min=2**-126))) - 2).clamp(-127, 127)
    v = x / torch.exp2(exp)[..., None]
    code = torch.bucketize(v.abs().clamp(max=6).contiguous(), FP4_MIDPOINTS) + 8 * (v < 0)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8), (exp + 127).to(torch.uint8)


def _layer(g: torch.Generator, d: int, f: int, e: int) -> dict[str, torch.Tensor]:
    """One layer's bf16 expert weights, in-memory names: (E, F, D) gate and up, (E, D, F) down, router (E, D)."""
    u = torch.linalg.qr(torch.randn(d, 64, generator=g)).Q  # the layer's shared directions
    out = {}
    for name, rows in (("gate", f), ("up", f), ("down", f)):
        w = 0.02 * torch.randn(e, rows, d, generator=g) + (0.1 * torch.randn(e, rows, 64, generator=g)) @ u.T
        out[name] = (w.transpose(1, 2) if name == "down" else w).to(torch.bfloat16)  # down (E, D, F)
    out["router"] = (0.02 * torch.randn(e, d, generator=g)).to(torch.bfloat16)
    return out


def write(root: Path, fmt: str, layers: int) -> None:
    """The bf16 checkpoint in root/bf16 and the quantised one in root/<fmt>, one shard a layer each."""
    d, f, e, top_k, model_type = SHAPES[fmt]
    g = torch.Generator().manual_seed(0)
    maps: dict[str, dict] = {"bf16": {}, fmt: {}}
    for layer in range(layers):
        w = _layer(g, d, f, e)
        p = f"model.layers.{layer}.mlp"
        if fmt == "fp8":  # per-expert names, as save_pretrained and the FP8 release write them
            plain = {p + ".gate.weight": w["router"]}
            quant = dict(plain)
            for i in range(e):
                for name, t in (("gate_proj", w["gate"][i]), ("up_proj", w["up"][i]), ("down_proj", w["down"][i])):
                    key = f"{p}.experts.{i}.{name}.weight"
                    plain[key] = t.contiguous()
                    quant[key], quant[key + "_scale_inv"] = quantize_fp8(t)
        else:  # gpt-oss: gate_up (E, D, 2F) interleaved, down (E, F, D); MXFP4 packs their transposes
            gate_up = torch.stack([w["gate"], w["up"]], dim=2).reshape(e, 2 * f, d).transpose(1, 2)
            down = w["down"].transpose(1, 2)
            plain = {p + ".router.weight": w["router"], p + ".router.bias": torch.zeros(e, dtype=torch.bfloat16),
                     p + ".experts.gate_up_proj": gate_up.contiguous(), p + ".experts.down_proj": down.contiguous()}
            quant = {k: v for k, v in plain.items() if "experts" not in k}
            for name, t in (("gate_up_proj", gate_up), ("down_proj", down)):
                packed = [quantize_mxfp4(t[i]) for i in range(e)]
                quant[f"{p}.experts.{name}_blocks"] = torch.stack([b for b, _ in packed])
                quant[f"{p}.experts.{name}_scales"] = torch.stack([s for _, s in packed])
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        for kind, tensors in (("bf16", plain), (fmt, quant)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(root / kind / shard), metadata={"format": "pt"})
            maps[kind].update({k: shard for k in tensors})
        del w, plain, quant
    config = {"model_type": model_type, "hidden_size": d, "num_hidden_layers": layers, "num_experts_per_tok": top_k,
              ("num_experts" if fmt == "fp8" else "num_local_experts"): e,
              ("moe_intermediate_size" if fmt == "fp8" else "intermediate_size"): f}
    quantization = ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                     "weight_block_size": [128, 128]} if fmt == "fp8" else {"quant_method": "mxfp4"})
    for kind in ("bf16", fmt):
        (root / kind / "config.json").write_text(json.dumps(config if kind == "bf16" else
                                                            {**config, "quantization_config": quantization}))
        (root / kind / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[kind]}))


def analyse(path: Path, out: Path, rank: int, threads: int) -> tuple[float, float, dict]:
    """`sdmoe analyze PATH --weights-only` in a fresh process: (wall s, peak RSS GiB, analysis.json)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sdmoe", "analyze", str(path), "--weights-only", "--rank",
                             str(rank), "--out", str(out), "--force"], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if status:
        raise SystemExit(f"sdmoe analyze {path} failed (status {status})")
    return seconds, usage.ru_maxrss / 2**20, json.loads((out / "analysis.json").read_text())


def _gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30


def _median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def bench(root: Path, fmt: str, layers: int, rank: int, threads: int, repeat: int) -> None:
    d, f, e, _, model_type = SHAPES[fmt]
    if not (root / fmt / "config.json").is_file():
        t = time.perf_counter()
        proc = mp.get_context("spawn").Process(target=write, args=(root, fmt, layers))  # its memory is not ours
        proc.start()
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"writing the {fmt} checkpoints failed")
        print(f"wrote {layers} layer(s) of {model_type} D={d}, F={f}, E={e}: bf16 {_gib(root / 'bf16'):.2f} GiB, "
              f"{fmt} {_gib(root / fmt):.2f} GiB, in {time.perf_counter() - t:.0f} s")
    # alternated (bf16, quantised, bf16, ...): load from other processes on the machine hits both alike
    runs: dict[str, list] = {"bf16": [], fmt: []}
    for _ in range(repeat):
        for kind in runs:
            runs[kind].append(analyse(root / kind, root / f"out-{kind}", rank, threads))
    for kind, rs in runs.items():
        print(f"  {kind:<6} analyze --weights-only: {_median(r[0] for r in rs):6.1f} s wall "
              f"({_median(r[2]['meta']['seconds'] for r in rs):.1f} s in the analysis), peak RSS "
              f"{_median(r[1] for r in rs):.2f} GiB" + (f" (median of {repeat}: {', '.join(f'{r[0]:.1f}' for r in rs)} s)"
                                                         if repeat > 1 else ""))
    (sb, rb, a), (sq, rq, b) = ((_median(r[0] for r in rs), _median(r[1] for r in rs), rs[0][2]) for rs in runs.values())
    diff = max(abs(x["mean_overlap"] - y["mean_overlap"]) for x, y in zip(a["parameters"], b["parameters"]))
    print(f"  {fmt}/bf16: time {sq / sb:.2f}x, peak RSS {rq / rb:.2f}x, disk {_gib(root / fmt) / _gib(root / 'bf16'):.2f}x;"
          f" findings: mean overlap differs by at most {diff:.4f} (bf16 values {a['parameters'][0]['mean_overlap']:.4f}...)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["fp8", "mxfp4", "both"], default="both")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers to write and analyse (default 2)")
    ap.add_argument("--quick", action="store_true", help="one layer")
    ap.add_argument("--rank", type=int, default=8, help="subspace rank k (= common rank r)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="analyses of each checkpoint, alternated (medians shown)")
    ap.add_argument("--keep", type=str, default="", help="write the checkpoints under this directory and keep them")
    args = ap.parse_args(argv)
    layers = 1 if args.quick else args.layers
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sdmoe-bench-quant-"))
    try:
        for fmt in (["fp8", "mxfp4"] if args.format == "both" else [args.format]):
            print(f"{fmt}: {layers} layer(s), rank {args.rank}, {args.threads} threads, {args.repeat} run(s) each")
            root = base / fmt
            bench(root, fmt, layers, args.rank, args.threads, args.repeat)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
