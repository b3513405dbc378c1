"""Training throughput (tokens/s) of the presets at 1 and 2 threads, baseline and SD-MoE, in one process.

Each measurement trains the preset's model on the bundled corpus for a few
steps after a warm-up (the split happens at step 0 for SD-MoE, so every timed
step carries its overhead) and reports median tokens/s; the ratio SD-MoE /
baseline is measured on the same thread count, interleaved.

    python benchmarks/bench_throughput.py [--quick] [--presets tiny,demo,small]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from sdmoe.data import prepare_dataset
from sdmoe.experiments.timing import training_step
from sdmoe.train.config import preset


def _with_method(cfg, method: str):
    cfg = copy.deepcopy(cfg)
    cfg.method = method
    return cfg




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", default="tiny,demo,small")
    args = ap.parse_args()
    steps = 6 if args.quick else 20
    print(f"tokens/s, median over {steps} interleaved steps after 3 warm-up steps")
    print(f"{'preset':7s} {'threads':>7s} {'baseline':>10s} {'sd-moe':>10s} {'ratio':>7s}")
    for name in args.presets.split(","):
        cfg = preset(name)
        data = prepare_dataset(cfg.data, seed=0)
        tokens = cfg.data.batch_size * cfg.data.seq_len
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = {m: training_step(_with_method(cfg, m), data) for m in ("baseline", "sd-moe")}
            times = {m: [] for m in runs}
            for _ in range(3):
                for fn in runs.values():
                    fn()
            for _ in range(steps):
                for m, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[m].append(time.perf_counter() - t0)
            tps = {m: tokens / statistics.median(t) for m, t in times.items()}
            print(f"{name:7s} {threads:7d} {tps['baseline']:10,.0f} {tps['sd-moe']:10,.0f} "
                  f"{tps['baseline'] / tps['sd-moe']:7.3f}")


if __name__ == "__main__":
    main()
