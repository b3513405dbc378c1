"""Benchmark `sdmoe.spectral` on one Qwen1.5-MoE-sized expert layer.

    python benchmarks/bench_spectral.py            # E=60, F=1408, D=2048 (minutes, ~4 GB RAM)
    python benchmarks/bench_spectral.py --quick    # small shapes, seconds

1. Common subspace of the stacked experts (E*F x D): dense torch.linalg.svd of
   the stack vs `common_subspace(method="gram")` vs `method="randomized"`;
   time ratios and each method's subspace error against the dense result.
   Weights are random with a planted rank-r common part so the subspace is
   well-defined.
2. Gradient tracking: `SubspaceTracker.update` (one warm-started iteration)
   vs the exact `common_subspace` on gradients of that shape, and on the
   lab's small shape (d=128, E=8, f=128, r=32).

Everything runs in one process, float32, torch.set_num_threads(2).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import time

import torch

from sdmoe.spectral import SubspaceTracker, common_subspace, exact_top, subspace_error

TARGET_GRAM_SPEEDUP = 4.0
TARGET_GRAM_ERROR = 1e-4
TARGET_RANDOMIZED_SPEEDUP = 10.0
DEFAULT_ITERS = inspect.signature(common_subspace).parameters["iters"].default


def planted(e: int, f: int, d: int, r: int, noise: float, seed: int) -> torch.Tensor:
    """E x F x D experts A_i U^T + noise * N_i (float32)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, r, generator=gen)).Q
    w = torch.randn(e, f, r, generator=gen) @ u.T
    w.add_(torch.randn(e, f, d, generator=gen), alpha=noise)
    return w


def timeit(fn, repeat: int, number: int = 1, warmup: bool = True):
    """(best seconds per call, last result): `repeat` rounds of `number` back-to-back calls."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for _ in range(number):
            out = fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best, out


def bench_common(e: int, f: int, d: int, r: int, repeat: int, number: int = 1) -> None:
    print(f"\n== common subspace of the stack: E={e} F={f} D={d} r={r} (stack {e * f} x {d}, float32) ==")
    w = planted(e, f, d, r, noise=0.1, seed=0)
    t_dense, vh = timeit(lambda: torch.linalg.svd(w.reshape(-1, d), full_matrices=False).Vh, 1, warmup=False)
    u_dense = vh[:r].T.contiguous()
    del vh
    gc.collect()
    t_gram, (u_gram, _) = timeit(lambda: common_subspace(w, r, "gram"), repeat, number)
    rand = {}
    for iters in (2, 3):
        t, (u, _) = timeit(lambda: common_subspace(w, r, "randomized", iters=iters), repeat, number)
        rand[iters] = (t, subspace_error(u, u_dense))
    err_gram = subspace_error(u_gram, u_dense)
    print(f"{'method':<30}{'seconds':>10}{'speed-up':>10}{'error vs dense':>16}   target")
    print(f"{'dense svd of stack':<30}{t_dense:>10.3f}{1.0:>9.1f}x{0.0:>16.1e}")
    ok_g = "ok" if t_dense / t_gram >= TARGET_GRAM_SPEEDUP and err_gram <= TARGET_GRAM_ERROR else "MISSED"
    print(f"{'gram (eigh of sum W^T W)':<30}{t_gram:>10.3f}{t_dense / t_gram:>9.1f}x{err_gram:>16.1e}"
          f"   >= {TARGET_GRAM_SPEEDUP:.0f}x, error <= {TARGET_GRAM_ERROR:.0e}: {ok_g}")
    for iters, (t, err) in rand.items():
        ok_r = "ok" if t_dense / t >= TARGET_RANDOMIZED_SPEEDUP else "MISSED"
        name = f"randomized (p=10, iters={iters}){'*' if iters == DEFAULT_ITERS else ''}"
        print(f"{name:<30}{t:>10.3f}{t_dense / t:>9.1f}x{err:>16.1e}   >= {TARGET_RANDOMIZED_SPEEDUP:.0f}x: {ok_r}")
    print("(* = library default; error 0 = below float32 resolution of the bases, ~1e-7)")
    t_rand = rand[DEFAULT_ITERS][0]
    print(f"ratios: dense/gram = {t_dense / t_gram:.1f}, dense/randomized = {t_dense / t_rand:.1f}")


def bench_tracker(e: int, f: int, d: int, r: int, repeat: int, label: str, number: int = 1) -> None:
    print(f"\n== gradient tracking ({label}): E={e} F={f} D={d} r={r} ==")
    g0 = planted(e, f, d, r, noise=0.3, seed=1)
    # next step's gradients: same common part, fresh noise (what one step changes)
    g1 = g0 + 0.05 * torch.randn(g0.shape, generator=torch.Generator().manual_seed(2))
    t_exact, exact = timeit(lambda: exact_top(g1, r), repeat, number)
    rows = []
    for p in (0, 8):
        tracker = SubspaceTracker(r, oversample=p)
        tracker.update(g0)  # exact init on the previous step

        state = tracker._q.clone()

        def step():
            tracker._q = state  # same warm start every repeat (update does not modify it in place)
            return tracker.update(g1)

        t_upd, q = timeit(step, repeat, number)
        rows.append((f"tracker.update (1 iter, p={p})", t_upd, subspace_error(q, exact)))
    print(f"{'path':<34}{'ms':>10}{'exact/this':>12}{'error vs exact':>16}")
    print(f"{'exact common_subspace (gram)':<34}{t_exact * 1e3:>10.2f}{1.0:>11.1f}x{0.0:>16.1e}")
    for name, t, err in rows:
        print(f"{name:<34}{t * 1e3:>10.2f}{t_exact / t:>11.1f}x{err:>16.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} (other processes skew timings)")
    if args.quick:
        bench_common(e=8, f=176, d=256, r=16, repeat=5, number=10)
        bench_tracker(e=8, f=176, d=256, r=64, repeat=5, label="quick, r=d/4", number=20)
    else:
        bench_common(e=60, f=1408, d=2048, r=64, repeat=2)
        bench_tracker(e=60, f=1408, d=2048, r=64, repeat=2, label="Qwen1.5-MoE layer, r=64")
        bench_tracker(e=60, f=1408, d=2048, r=512, repeat=1, label="Qwen1.5-MoE layer, r=d/4")
    bench_tracker(e=8, f=128, d=128, r=32, repeat=5, label="lab shape", number=100)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
