"""What the expert-parallel tests share (`tests/train/test_expert_parallel.py`, and the stacks' own EP in
`tests/integrations/test_{torchtitan,olmo_core}_ep.py`): the variants and tolerances, the comparison with one
process, the torchrun launch, and the worker's frame (a reducer broken on request, every rank's records
gathered to rank 0)."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Gradients after the split, shared parts and weights: 1e-6 absolute; losses (about 4.8): 1e-6 relative;
# the tracked subspace (Q_r Q_r^T): 1e-4, as its float32 subspace iteration moves the span by the sums'
# rounding (~1e-9) over the gap between the r-th and the next singular value of the gradients.
TOL = {"losses": 5e-6, "split_grads": 1e-6, "shared": 1e-6, "weights": 1e-6, "q": 1e-4}
VARIANTS = {
    "baseline": None,
    "default": dict(split_step=0, rank=4, tracker_oversample=2),
    # the paper's split (experiments.grid's `paper`), refreshed every 2 steps so a refresh runs on the shards
    "paper": dict(split_step=0, form="full", gradient_split="fixed", projection_sides="two", basis_source="shared",
                  basis_method="randomized", refresh_every=2, rank=8),
    "control": dict(split_step=0, rank=4, gradient_split="none"),
}
BROKEN = "SDMOE_TEST_LOCAL_ONLY_REDUCER"  # the worker sums over its own experts only (the bug these tests guard)
ONLY = "SDMOE_TEST_VARIANT"  # with BROKEN: the one variant the worker runs

Run = Callable[[int, int, str], dict]  # (world, rank, variant) -> that run's records


def record_split_state(record: dict, controller) -> None:
    """After a step: the tracked subspace the split uses (its top-r columns, Q_r Q_r^T: the oversampled
    ones may swap places) and the shared parts, as lists, appended to record["q"] and record["shared"]."""
    layers = controller.layers
    record["q"].append([((q := layer.q_PDX[..., :layer.r]) @ q.mT).tolist() for layer in layers
                        if layer.q_PDX is not None])
    record["shared"].append([s.tolist() for layer in layers for s in layer.shared.values()])


def gap(a, b) -> float:
    """The largest absolute difference of two nested lists of numbers (ragged ones item by item)."""
    try:
        return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max())
    except ValueError:
        return max(gap(x, y) for x, y in zip(a, b, strict=True))


def compare(one: dict, many: list[dict]) -> dict[str, float]:
    """{what: the largest gap to the one-process run over ranks and steps}."""
    gaps = {"losses": gap(one["losses"], many[0]["losses"])}
    for key in ("split_grads", "q", "shared"):
        if one[key] and one[key][0]:
            gaps[key] = max(gap(one[key], r[key]) for r in many)
    gaps["weights"] = max(gap(one["weights"][n], r["weights"][n]) for r in many for n in one["weights"])
    return gaps


def worker(out: str, run: Run, extra: dict[str, Callable[[int, int], dict]] | None = None) -> None:
    """A torchrun worker: {variant: run(world, rank, variant)} for every variant, and each of `extra`'s runs,
    gathered by rank 0 into `out` (JSON). With BROKEN set the reducer sums over this rank's experts only
    and only the variant ONLY names runs."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    broken = bool(os.environ.get(BROKEN))
    if broken:
        import sdmoe.method.sharding as sharding

        sharding.reducer = lambda x: None  # every sum over experts stays on this rank's experts
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {v: run(world, rank, v) for v in ([os.environ[ONLY]] if broken else VARIANTS)}
    if not broken:
        result |= {name: fn(world, rank) for name, fn in (extra or {}).items()}
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def launch(module: str, args: list[str], out: Path, world: int = 2, broken: str | None = None) -> list[dict]:
    """`torchrun -m module *args out` on `world` CPU processes from the repository root; every rank's records.
    broken: run that variant alone with the local-only reducer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({BROKEN: "1", ONLY: broken} if broken else {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", module, *args, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())
