"""`make bench`: every benchmark, one after the other, each printing ratios measured in its own process.

    python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# (script, its own arguments): the method's overhead on both presets the issue names, each in three fresh
# processes (the spread between processes is larger than within one), then the rest
BENCHMARKS = [("bench_method.py", ["--preset", "small", "--repeat", "3"]),
              ("bench_method.py", ["--preset", "demo", "--repeat", "3"]),
              ("bench_experts.py", []), ("bench_throughput.py", []), ("bench_spectral.py", []),
              ("bench_analysis.py", []), ("bench_fsdp_memory.py", []), ("bench_quantized.py", [])]


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for name, own in BENCHMARKS:
        args = [*own, *extra]
        print(f"\n=== {name} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *args]).returncode:
            failed.append(f"{name} {' '.join(own)}".strip())
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
