"""Time and peak memory of `sdmoe upcycle` on a Qwen-1.8B-shaped dense model (random weights, from its config),
and of mergekit-moe on the same model.

    .venv/bin/python benchmarks/bench_upcycle.py                 # 24 layers: ~3.7 GB in, ~28 GB out (bf16)
    .venv/bin/python benchmarks/bench_upcycle.py --layers 4      # the same shapes, 4 layers (~5 GB out)
    .venv/bin/python benchmarks/bench_upcycle.py --layers 4 --mergekit          # and mergekit-moe, as ratios
    .venv/bin/python benchmarks/bench_upcycle.py --layers 4 --mergekit --router hidden   # routers from prompts

The dense checkpoint is written shard by shard (one decoder layer at a time, never the whole model in
memory), then upcycled to 8 experts top-2 (`copy`) in a fresh process whose peak resident set
(VmHWM, via getrusage of the child) is printed against the output's size on disk and its largest shard:
upcycling reads one layer and writes one shard at a time, so its peak follows the largest shard, not the model.
With `--mergekit` (`pip install "sdmoe[mergekit]"`), `mergekit-moe` builds the same MoE (qwen3 -> Qwen3 MoE,
the dense FFN copied into every expert, `gate_mode` random or hidden, bf16, on the CPU) in its own fresh
process, and the two are compared: time and peak RSS, ours / mergekit's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
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


# runs a command in a fresh child and reports that child's own peak RSS (RUSAGE_CHILDREN of this wrapper
# counts only it, not an earlier command of the benchmark)
_MEASURE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024; "
            "print(json.dumps([time.perf_counter() - t, peak]))")
PROMPT_LINES = ["def f(x): return x", "the integral of x squared", "Once upon a time", "SELECT * FROM users",
                "Translate to French: hello", "The patient presented with", "git rebase --onto", "Dear Sir or Madam"]


def measure(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of `cmd` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}")
    seconds, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, peak


def prompt_files(root: Path, experts: int) -> list[Path]:
    """One prompt file per expert, each a line of its own kind of text and one shared line."""
    files = []
    for i in range(experts):
        files.append(root / f"expert{i}.txt")
        files[-1].write_text(f"{PROMPT_LINES[i % len(PROMPT_LINES)]}\nan example of kind {i}\n", encoding="utf-8")
    return files


def run_ours(dense: Path, out: Path, experts: int, router: str, prompts: list[Path]) -> tuple[float, int]:
    extra = ["--router", router, "--prompts", *map(str, prompts)] if router != "random" else []
    return measure([sys.executable, "-m", "sdmoe", "upcycle", str(dense), "--experts", str(experts), "--top-k", "2",
                    "--out", str(out), "--quiet", *extra])


def run_mergekit(dense: Path, out: Path, experts: int, router: str, prompts: list[Path]) -> tuple[float, int]:
    """mergekit-moe on the same dense model: every expert the dense FFN (the same recipe as our `copy`)."""
    config = {"base_model": str(dense), "gate_mode": router, "dtype": "bfloat16", "experts_per_token": 2,
              "experts": [{"source_model": str(dense),
                           **({"positive_prompts": p.read_text().splitlines()} if router != "random" else {})}
                          for p in (prompts or [None] * experts)]}
    cfg = out.parent / "mergekit-moe.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    return measure([sys.executable, "-m", "mergekit.scripts.moe", str(cfg), str(out), "--device", "cpu",
                    "--i-understand-this-is-not-useful-without-training", "--quiet"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen-1.8B has 24)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temp dir, removed after)")
    ap.add_argument("--mergekit", action="store_true", help="also run mergekit-moe on the same model, and compare")
    ap.add_argument("--router", default="random", choices=["random", "hidden"],
                    help="random routers, or from one prompt file per expert (mergekit: gate_mode hidden)")
    args = ap.parse_args()
    if args.mergekit and importlib.util.find_spec("mergekit") is None:
        sys.exit('--mergekit needs mergekit: pip install "sdmoe[mergekit]"')
    gib = 2 ** 30
    with tempfile.TemporaryDirectory(prefix="bench-upcycle-", dir=args.dir) as tmp:
        dense, moe = Path(tmp) / "dense", Path(tmp) / "moe"
        dense_bytes = write_dense(dense, args.layers)
        prompts = prompt_files(Path(tmp), args.experts) if args.router != "random" else []
        seconds, peak = run_ours(dense, moe, args.experts, args.router, prompts)
        files = list(moe.glob("*.safetensors"))
        out_bytes, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
        print(f"Qwen-1.8B shapes, {args.layers} layers, bf16: dense {dense_bytes / gib:.2f} GiB -> {args.experts} "
              f"experts {out_bytes / gib:.2f} GiB in {len(files)} shards (largest {largest / gib:.2f} GiB)")
        print(f"sdmoe upcycle ({args.router} routers): {seconds:.1f} s; peak RSS {peak / gib:.2f} GiB = "
              f"{peak / out_bytes:.3f} x the output, {peak / largest:.2f} x its largest shard (target: <= 2 x the "
              "output)")
        if args.mergekit:
            shutil.rmtree(moe)  # the disk holds one output at a time
            mk_seconds, mk_peak = run_mergekit(dense, Path(tmp) / "mergekit", args.experts, args.router, prompts)
            mk_bytes = sum(f.stat().st_size for f in (Path(tmp) / "mergekit").glob("*.safetensors"))
            print(f"mergekit-moe (gate_mode {args.router}): {mk_seconds:.1f} s; peak RSS {mk_peak / gib:.2f} GiB; "
                  f"output {mk_bytes / gib:.2f} GiB")
            print(f"ours / mergekit-moe: time {seconds / mk_seconds:.2f}x, peak memory {peak / mk_peak:.2f}x")


if __name__ == "__main__":
    main()
