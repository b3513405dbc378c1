"""Each rank's peak memory under FSDP2 from the meta device, against one process holding the model whole.

    .venv/bin/python benchmarks/bench_fsdp_memory.py              # qwen3_moe, 16 layers x 16 experts: 3.3 GiB fp32
    .venv/bin/python benchmarks/bench_fsdp_memory.py --layers 8   # 1.7 GiB
    .venv/bin/python benchmarks/bench_fsdp_memory.py --quick      # 4 layers: 0.9 GiB

Five fresh process groups, one after the other, each reporting its own peak resident set (getrusage's
ru_maxrss: every page it ever touched, the memory-mapped checkpoint's included):
  build     one process: `sdmoe.models.build_model` (the whole model drawn in memory)
  build-2   2 ranks (torchrun, gloo): `sdmoe.train.fsdp.build_sharded` (meta device, then each rank its shards)
  load      one process: `AutoModelForCausalLM.from_pretrained` of the saved checkpoint
  load-2    2 ranks: `sdmoe.train.fsdp.from_pretrained_sharded` (each rank reads only its slices)
and the ratio of the larger rank's peak to the one-process peak (target: at most 0.65 at 2 ranks). The
imported libraries' own resident set (`import torch, transformers` alone) is printed for scale. A rank holds
the libraries, its half of the model and, while `init_shards` draws it, one module's tensors whole (the
largest: an MoE layer's experts), so the ratio falls towards 1/2 as layers are added (--layers 16).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 8192


def model_cfg(layers: int):
    from sdmoe.models import ModelConfig

    return ModelConfig(style="qwen3_moe", hidden_size=1024, num_layers=layers, num_heads=8, num_experts=16,
                       top_k=2, expert_ffn=1024)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(role: str, layers: int, path: str, out: str) -> None:
    """One measured process (a rank, under torchrun): build or load, then write its peak to `out`."""
    import torch

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    if role == "imports":
        import transformers  # noqa: F401

        import sdmoe.train.fsdp  # noqa: F401
    elif role in ("build", "save"):
        from sdmoe.models import build_model

        model = build_model(model_cfg(layers), VOCAB, seed=0)
        if role == "save":  # the checkpoint the load roles read (not measured: saving has peaks of its own)
            model.save_pretrained(path)
    elif role == "load":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    else:
        import torch.distributed as dist

        from sdmoe.train.fsdp import build_sharded, from_pretrained_sharded

        dist.init_process_group("gloo")
        if role == "build-2":
            build_sharded(model_cfg(layers), VOCAB, seed=0)
        else:
            from_pretrained_sharded(path)
        dist.barrier()
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps({"peak_mib": peak_mib()}))


def measure(role: str, layers: int, path: str, work: Path) -> list[float]:
    out = work / role
    args = [__file__, "--worker", role, "--layers", str(layers), "--path", path, "--out", str(out)]
    ranks = 2 if role.endswith("-2") else 1
    cmd = [sys.executable, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    return [json.loads(Path(f"{out}.{r}").read_text())["peak_mib"] for r in range(ranks)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers instead of 16 (0.9 GiB)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; --quick 4)")
    ap.add_argument("--target", type=float, default=0.65, help="largest rank peak / one-process peak to meet")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    layers = a.layers or (4 if a.quick else 16)
    if a.worker:
        worker(a.worker, layers, a.path, a.out)
        return 0

    import torch
    from transformers import AutoModelForCausalLM

    from sdmoe.models.build import model_hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_hf_config(model_cfg(layers), VOCAB))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"qwen3_moe d=1024, {layers} layers x 16 experts (ffn 1024), vocab {VOCAB}: {n_params / 1e6:.0f}M "
          f"parameters, {n_params * 4 / 2**30:.2f} GiB fp32; 2 ranks on gloo (CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        work, ckpt = Path(tmp), str(Path(tmp) / "ckpt")
        rows = {}
        for role, path in (("imports", ""), ("build", ""), ("save", ckpt), ("build-2", ""), ("load", ckpt), ("load-2", ckpt)):
            t0 = time.perf_counter()
            rows[role] = measure(role, layers, path, work)
            if role != "save":
                print(f"  {role:8s} peak RSS per process {', '.join(f'{m:7.0f} MiB' for m in rows[role])}"
                      f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = rows["imports"][0]
    layer_experts = 16 * 3 * 1024 * 1024 * 4 / 2**20
    print(f"one rank's own shards: {n_params * 2 / 2**20:.0f} MiB; build-2's rank above that and the libraries: "
          f"{max(rows['build-2']) - base - n_params * 2 / 2**20:.0f} MiB (init_shards draws each module whole: "
          f"one MoE layer's experts are {layer_experts:.0f} MiB)")
    ok = True
    for sharded, whole in (("build-2", "build"), ("load-2", "load")):
        ratio = max(rows[sharded]) / rows[whole][0]
        above = (max(rows[sharded]) - base) / (rows[whole][0] - base)
        ok &= ratio <= a.target
        print(f"{sharded} / {whole}: largest rank's peak = {ratio:.2f} x one process "
              f"(target <= {a.target}: {'met' if ratio <= a.target else 'MISSED'}); "
              f"above the libraries' own {base:.0f} MiB: {above:.2f} x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
