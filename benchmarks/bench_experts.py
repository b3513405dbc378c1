"""Expert forward+backward: transformers' own kernels, in one process.

SD-MoE leaves the host's experts untouched (it transforms gradients, after the
backward), so its forward and backward are the host's own: the kernel to use is
whichever host kernel is fastest on the device. This prints, on the same shapes
and the same routing, the time of `eager`, `batched_mm` and `grouped_mm`, and
which is fastest.

    python benchmarks/bench_experts.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdmoe.device import autocast, resolve_device, synchronize
from sdmoe.models import ModelConfig, build_model
from sdmoe.moe import find_moe_blocks

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench(d: int, f: int, e: int, k: int, tokens: int, repeats: int,
          device: torch.device = torch.device("cpu")) -> list[tuple[str, str, float]]:
    cfg = ModelConfig(style="qwen3_moe", hidden_size=d, num_layers=1, num_heads=4, num_experts=e, top_k=k, expert_ffn=f)
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(tokens, d, generator=gen).to(device).requires_grad_()
    logits_TE = torch.randn(tokens, e, generator=gen).to(device)
    weights_TK, index_TK = torch.softmax(logits_TE, -1).topk(k, dim=-1)
    rows = []
    for variant in ("plain",):
        model = build_model(cfg, vocab_size=256, device=device)
        experts = find_moe_blocks(model)[0].experts
        for impl in IMPLEMENTATIONS:
            # batched_mm gathers a weight matrix per (token, expert) pair: skip it where that
            # copy alone would pass 1 GiB (it is the slowest kernel on CPU at every size tried).
            if impl == "batched_mm" and tokens * k * 3 * f * d * 4 > 2**30:
                rows.append((variant, impl, float("nan")))
                continue
            experts.config._experts_implementation = impl

            def step():
                with autocast("auto", device):  # bf16 on CUDA, as training runs there
                    out = experts(x_TD, index_TK, weights_TK)
                out.float().square().mean().backward()
                synchronize(device)

            try:
                rows.append((variant, impl, _time(step, repeats)))
            except Exception as e:  # noqa: BLE001 - an implementation may not exist on this device
                rows.append((variant, impl, float("nan")))
                print(f"  {variant} {impl}: unavailable ({type(e).__name__}: {str(e)[:80]})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (on CUDA under bf16 autocast)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    shapes = [("demo", 64, 64, 8, 2, 1024)] if args.quick else [
        ("demo", 64, 64, 8, 2, 1024), ("small", 128, 128, 8, 2, 2048), ("wide", 256, 512, 16, 4, 2048)]
    print(f"experts forward+backward, median of {5 if args.quick else 15}, {args.threads} threads")
    for name, d, f, e, k, tokens in shapes:
        rows = bench(d, f, e, k, tokens, 5 if args.quick else 15, device)
        print(f"{name}: d={d} f={f} E={e} top-{k}, {tokens} tokens")
        for variant, impl, t in rows:
            print(f"  {variant:7s} {impl:11s} " + (f"{t * 1e3:8.2f} ms" if t == t else "  skipped (memory)"))
        times = sorted((t, impl) for _, impl, t in rows if t == t)
        print(f"  fastest host kernel: {times[0][1]}; next / fastest = {times[1][0] / times[0][0]:.3f}")


if __name__ == "__main__":
    main()
