"""Time and peak memory of `sdmoe upcycle` on a Qwen-1.8B-shaped dense model (random weights, from its config).

    .venv/bin/python benchmarks/bench_upcycle.py                 # 24 layers: ~3.7 GB in, ~28 GB out (bf16)
    .venv/bin/python benchmarks/bench_upcycle.py --layers 4      # the same shapes, 4 layers (~5 GB out)

The dense checkpoint is written shard by shard (one decoder layer at a time, never the whole model in
memory), then upcycled to 8 experts top-2 (`copy`) in a fresh process whose peak resident set
(VmHWM, via getrusage of the child) is printed against the output's size on disk and its largest shard:
upcycling reads one layer and writes one shard at a time, so its peak follows the largest shard, not the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Qwen-1.8B's shapes (its config.json), as a qwen3 model
QWEN_1_8B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_attention_heads=16,
                 num_key_value_heads=16, head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False)


def write_dense(path: Path, layers: int) -> int:
    """A random bf16 qwen3 checkpoint of Qwen-1.8B's shapes, one shard a layer; returns its bytes."""
    from transformers import AutoConfig

    from sdmoe.data import prepare_dataset
    from sdmoe.train.config import preset

    cfg = AutoConfig.for_model("qwen3", num_hidden_layers=layers, **QWEN_1_8B)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    prepare_dataset(preset("tiny").data, seed=0).tokenizer.save_pretrained(path)  # any tokenizer: never used
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        one = torch.ones(d, dtype=torch.bfloat16)
        return {p + "self_attn.q_proj.weight": rnd(cfg.num_attention_heads * hd, d),
                p + "self_attn.k_proj.weight": rnd(cfg.num_key_value_heads * hd, d),
                p + "self_attn.v_proj.weight": rnd(cfg.num_key_value_heads * hd, d),
                p + "self_attn.o_proj.weight": rnd(d, cfg.num_attention_heads * hd),
                p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                p + "input_layernorm.weight": one, p + "post_attention_layernorm.weight": one.clone(),
                p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
                p + "mlp.down_proj.weight": rnd(d, f)}

    # each shard made when it is written: one layer in memory at a time
    makers = [lambda: {"model.embed_tokens.weight": rnd(v, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}]
    makers += [lambda i=i: layer(i) for i in range(layers)]
    makers += [lambda: {"lm_head.weight": rnd(v, d)}]
    weight_map, size = {}, 0
    for k, make in enumerate(makers):
        tensors = make()
        name = f"model-{k + 1:05d}-of-{len(makers):05d}.safetensors"
        save_file(tensors, str(path / name))
        weight_map.update({key: name for key in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                   "weight_map": weight_map}))
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen-1.8B has 24)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temp dir, removed after)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upcycle-", dir=args.dir) as tmp:
        dense, moe = Path(tmp) / "dense", Path(tmp) / "moe"
        dense_bytes = write_dense(dense, args.layers)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdmoe", "upcycle", str(dense), "--experts", str(args.experts),
                        "--top-k", "2", "--out", str(moe), "--quiet"], check=True)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the upcycle process's, in bytes
        files = list(moe.glob("*.safetensors"))
        out_bytes, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    gib = 2 ** 30
    print(f"Qwen-1.8B shapes, {args.layers} layers, bf16: dense {dense_bytes / gib:.2f} GiB -> {args.experts} "
          f"experts {out_bytes / gib:.2f} GiB in {len(files)} shards (largest {largest / gib:.2f} GiB)")
    print(f"upcycle: {seconds:.1f} s; peak RSS {peak / gib:.2f} GiB = {peak / out_bytes:.3f} x the output, "
          f"{peak / largest:.2f} x its largest shard (target: <= 2 x the output)")


if __name__ == "__main__":
    main()
