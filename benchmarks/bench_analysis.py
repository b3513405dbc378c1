"""Benchmark: finding 1 (parameter spectra) on Qwen1.5-MoE-sized layers read lazily from disk.

Qwen1.5-MoE-A2.7B: 24 MoE layers, E=60 routed experts, F=1408, D=2048. The
whole model's experts are 24 x 60 x 3 x 1408 x 2048 values (50 GB in float32,
25 GB in bf16), too much to write here, so this script writes N layers of
that exact shape in bf16 (per-expert tensor names, one shard per layer plus
an index, as `save_pretrained` would), runs the checkpoint reader + finding 1
on them layer by layer, and extrapolates the time to 24 layers. Peak memory
does not grow with the layer count (one layer in memory at a time).

    python benchmarks/bench_analysis.py            # 2 layers (about 2 GB of disk)
    python benchmarks/bench_analysis.py --quick    # 1 layer
    python benchmarks/bench_analysis.py --layers 4 --keep /tmp/qwen-like

Target (spec): the whole 24-layer model in < 10 min on 2 CPU cores, peak RSS < 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdmoe.analysis.parameters import parameter_findings
from sdmoe.moe.checkpoint import ExpertCheckpoint

E, F, D, FULL_LAYERS = 60, 1408, 2048, 24
TARGET_S, TARGET_GIB = 600.0, 8.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def write_checkpoint(root: Path, layers: int, seed: int = 0) -> None:
    """Qwen2-MoE-style names, bf16, one shard per layer; weights with a planted common subspace."""
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for layer in range(layers):
        u = torch.linalg.qr(torch.randn(D, 64, generator=g)).Q  # shared directions of this layer
        tensors = {}
        prefix = f"model.layers.{layer}.mlp"
        for i in range(E):
            for name, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
                w = 0.02 * torch.randn(*shape, generator=g)
                common = (0.1 * torch.randn(F, 64, generator=g)) @ u.T  # F x D
                w += common if name != "down_proj" else common.T
                tensors[f"{prefix}.experts.{i}.{name}.weight"] = w.to(torch.bfloat16)
        tensors[f"{prefix}.gate.weight"] = (0.02 * torch.randn(E, D, generator=g)).to(torch.bfloat16)
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, str(root / shard))
        weight_map.update({k: shard for k in tensors})
        del tensors
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(
        json.dumps({"model_type": "qwen2_moe", "hidden_size": D, "num_experts": E, "moe_intermediate_size": F,
                    "num_experts_per_tok": 4, "num_hidden_layers": FULL_LAYERS})
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one layer")
    ap.add_argument("--layers", type=int, default=2, help="layers to write and analyse (default 2)")
    ap.add_argument("--rank", type=int, default=8, help="subspace rank k (= common rank r)")
    ap.add_argument("--keep", type=str, default="", help="write the checkpoint here and keep it")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = 1 if args.quick else args.layers
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sdmoe-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / "model.safetensors.index.json").is_file():
            t = time.perf_counter()
            # in a child process, so its memory does not count in this process's peak RSS
            import multiprocessing as mp

            proc = mp.get_context("spawn").Process(target=write_checkpoint, args=(root, layers))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                print("writing the checkpoint failed", file=sys.stderr)
                return 2
            print(f"wrote {layers} layer(s) of E={E}, F={F}, D={D} in bf16 to {root} "
                  f"({sum(p.stat().st_size for p in root.glob('*.safetensors')) / 2**30:.2f} GiB) "
                  f"in {time.perf_counter() - t:.1f} s")
        rss0 = peak_rss_gib()
        ckpt = ExpertCheckpoint(root)
        per_layer = []
        records = []
        t_all = time.perf_counter()
        for lw in ckpt.iter_layers(dtype=torch.float32):
            t = time.perf_counter()
            records.extend(parameter_findings([lw], args.rank, args.rank))
            per_layer.append(time.perf_counter() - t)
            del lw
        total = time.perf_counter() - t_all  # includes reading
        peak = peak_rss_gib()
        for r in records:
            print(f"  L{r.layer} {r.projection:<5} overlap {r.mean_overlap:.4f} ({r.ratio:.1f}x k/d)  "
                  f"common energy {sum(r.common_energy) / len(r.common_energy):.3f}  method {r.method}")
        per = total / len(ckpt.layers)
        est = per * FULL_LAYERS
        print(f"read + finding 1: {total:.1f} s for {len(ckpt.layers)} layer(s) ({per:.1f} s/layer incl. reading; "
              f"compute {sum(per_layer) / len(per_layer):.1f} s/layer), {torch.get_num_threads()} threads")
        print(f"extrapolated to {FULL_LAYERS} layers: {est / 60:.1f} min (target < {TARGET_S / 60:.0f} min): "
              f"{'OK' if est < TARGET_S else 'MISSED'}")
        print(f"peak RSS {peak:.2f} GiB (before reading: {rss0:.2f} GiB; target < {TARGET_GIB:.0f} GiB): "
              f"{'OK' if peak < TARGET_GIB else 'MISSED'}")
        return 0 if est < TARGET_S and peak < TARGET_GIB else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
