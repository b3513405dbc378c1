"""Step time of SD-MoE against the baseline, measured so that two compares agree.

Run-against-run step times (what a compare's metrics hold) move with whatever
else the machine does. Here both models live in one process and alternate step
by step (A B A B ...), so drift and load hit both sides alike; the split happens
at step 0, so every timed SD-MoE step carries its whole overhead. That is done
in several fresh processes, one after the other: the ratio moves more between
processes (each has its own heap and page layout, so page faults land on
different sides) than between the rounds of one (docs/performance.md), so one
process's median ratio is one sample, and the interval is over processes.

Every step is timed on two clocks: wall time and the process's CPU time (all its
threads). CPU time does not count the time another job holds the cores, so on a
shared machine it is often the steadier one; `analyze` uses whichever clock's
own spread is narrower and says which. The steps run on the runs' own device
(`loop.device`): on a GPU a step waits for its work, and only wall time counts.

    sample = measure({"baseline": cfg_a, "sd-moe": cfg_b}, dataset, processes=4, rounds=6)
    figures = analyze({"qwen2_moe": sample})   # pure arithmetic on the saved sample

This module imports torch only inside the functions that train, so the report
(`sdmoe.experiments.claims`) can read samples without it.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from sdmoe.experiments import stats

TIMING_FILE = "timing.json"  # a compare's samples, {style: sample}: measured once (delete it to measure again)
STEPS_PER_ROUND = 8  # steps per side in a round; the round's figure is their median
WARMUP_STEPS = 3  # per side, untimed: allocator and kernel caches settle
CLOCKS = ("cpu", "wall")
CLOCK_NAMES = {"cpu": "process CPU time", "wall": "wall time"}
SPREAD_COVERAGE = 95.0  # a side's own spread: the central 95% of its rounds


def training_step(cfg, data) -> Callable[[], None]:
    """One full optimizer step of `cfg` per call: `sdmoe train`'s own `TrainStep` (forward, loss and balance
    loss, backward, and in the optimizer step's hooks the SD-MoE split, the clip, the shared update and the
    bias update), on the run's own device and precision (`loop.device`, `loop.precision`). SD-MoE splits at
    the first call, so every timed step carries its whole overhead; on a GPU each call waits for its work, so
    a step's time is the step's, not its launch's."""
    import dataclasses

    from sdmoe.device import resolve_device, synchronize
    from sdmoe.train.optim import build_optimizer
    from sdmoe.train.step import TrainStep, start_model

    device = resolve_device(cfg.loop.device)
    cfg = dataclasses.replace(cfg, sdmoe=dataclasses.replace(cfg.sdmoe, split_step=0))
    model = start_model(cfg, data.tokenizer, device)
    optimizer = build_optimizer(model, cfg.optim)
    train_step = TrainStep(cfg, model, optimizer, device)
    model.train()
    step = [0]

    def run() -> None:
        train_step(data.train.sample(step[0])[0].to(device))
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step[0] += 1

    return run


def interleaved_step_times(configs: dict, data, rounds: int = 5, steps_per_round: int = STEPS_PER_ROUND,
                           warmup: int = WARMUP_STEPS) -> dict[str, dict[str, list[float]]]:
    """{clock: {name: median step time (s) of each round}}; the configs alternate step by step."""
    steps = {name: training_step(cfg, data) for name, cfg in configs.items()}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    medians = {clock: {name: [] for name in steps} for clock in CLOCKS}
    for _ in range(rounds):
        samples = {clock: {name: [] for name in steps} for clock in CLOCKS}
        for _ in range(steps_per_round):
            for name, fn in steps.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                samples["wall"][name].append(time.perf_counter() - t0)
                samples["cpu"][name].append(time.process_time() - c0)
        for clock in CLOCKS:
            for name, values in samples[clock].items():
                medians[clock][name].append(statistics.median(values))
    return medians


def _one_process(configs: dict, data, rounds: int) -> dict:
    """What one fresh process measures: the threads and algorithms `train()` would use, then the rounds."""
    import torch

    from sdmoe.device import resolve_device
    from sdmoe.train.process_state import process_state

    loop = next(iter(configs.values())).loop
    device = resolve_device(loop.device)
    with process_state(loop, device):
        times = interleaved_step_times(configs, data, rounds)
        threads = torch.get_num_threads()
    return {**times, "threads": threads, "device": str(device)}


def measure(configs: dict, data, processes: int, rounds: int) -> dict:
    """A timing sample: `processes` fresh processes, one after the other, each timing `rounds` rounds.

    Fresh (a new interpreter, not a fork) so each has its own heap, as a new compare
    would; one after the other so they never compete for the cores they time. A
    subprocess of this module rather than multiprocessing's spawn, which would re-run
    the caller's own script in the child.
    """
    import os
    import pickle
    import subprocess
    import tempfile
    from pathlib import Path

    import sdmoe

    env = dict(os.environ)
    # The child imports this very code, however the parent found it.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(sdmoe.__file__).resolve().parents[1])]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    runs = []
    with tempfile.TemporaryDirectory(prefix="sdmoe-timing-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.json"
        job.write_bytes(pickle.dumps((configs, data, rounds)))
        for i in range(processes):
            res = subprocess.run([sys.executable, "-m", __name__, str(job), str(result)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"timing process {i + 1} of {processes} failed:\n{res.stderr[-4000:]}")
            runs.append(json.loads(result.read_text()))
    return {"version": 2, "rounds": rounds, "steps_per_round": STEPS_PER_ROUND, "processes": runs}


def _child(job: str, result: str) -> None:
    """`python -m sdmoe.experiments.timing JOB RESULT`: one process of `measure`."""
    import pickle
    from pathlib import Path

    configs, data, rounds = pickle.loads(Path(job).read_bytes())
    Path(result).write_text(json.dumps(_one_process(configs, data, rounds)))


# -- the figures of a sample (no torch) --------------------------------------------------


def _processes(sample: dict) -> list[dict]:
    """The sample's processes; a timing.json from before version 2 (one process, wall time only) as one."""
    if "processes" in sample:
        return list(sample["processes"])
    return [{"wall": {k: v for k, v in sample.items() if isinstance(v, list)}}]


def _side_spread(values: list[float]) -> dict:
    """A side's median step time and the central SPREAD_COVERAGE% of its rounds, in seconds and / median."""
    xs = np.asarray(values, dtype=float)
    med = float(np.median(xs))
    lo, hi = (float(x) for x in np.percentile(xs, [(100 - SPREAD_COVERAGE) / 2, (100 + SPREAD_COVERAGE) / 2]))
    return {"median": med, "lo": lo, "hi": hi, "n": int(xs.size),
            "half_width": (hi - lo) / (2 * med) if med > 0 else math.nan}


def _on_clock(samples: dict[str, dict], clock: str, num: str, den: str) -> dict | None:
    per_pair, rounds, sides = {}, {}, {}
    for style, sample in samples.items():
        procs = _processes(sample)
        if not procs or not all(clock in p and num in p[clock] and den in p[clock] for p in procs):
            return None
        for i, p in enumerate(procs):
            ratios = [a / b for a, b in zip(p[clock][num], p[clock][den]) if b > 0]
            if ratios:
                per_pair[f"{style}/process{i + 1}"] = statistics.median(ratios)
                rounds.update({f"{style}/process{i + 1}/round{j + 1}": r for j, r in enumerate(ratios)})
        sides[style] = {side: _side_spread([x for p in procs for x in p[clock][side]]) for side in (den, num)}
    if not per_pair:
        return None
    # Processes are the samples; a single process leaves only its rounds, which miss the
    # spread between processes (the figure says so).
    by_process = len(per_pair) > len(samples)
    iv = stats.t_interval(list(per_pair.values()) if by_process else list(rounds.values()))
    half = max(s["half_width"] for sd in sides.values() for s in sd.values())
    return {"clock": clock, "clock_name": CLOCK_NAMES[clock], "interval": iv.to_dict(), "by": "process" if
            by_process else "round", "per_pair": per_pair if by_process else rounds, "sides": sides,
            "noise_rel": half, "noise": half * iv.mean if math.isfinite(iv.mean) else math.nan}


def analyze(samples: dict[str, dict], num: str = "sd-moe", den: str = "baseline") -> dict | None:
    """The ratio num / den from timing samples ({style: sample}), on the clock whose sides spread less.

    Returns interval (t over processes; over rounds when there is one process a
    style), per_pair, each side's own spread (`sides`), `noise`: the wider of the two
    sides' relative half-spreads, in units of the ratio, and the same for the other
    clock under `other`. None without samples.
    """
    figures = {c: f for c in CLOCKS if samples and (f := _on_clock(samples, c, num, den)) is not None}
    if any(p.get("device", "cpu") != "cpu" for sample in samples.values() for p in _processes(sample)):
        figures.pop("cpu", None)  # on a GPU the host's CPU time is not the step's work: wall time only
    if not figures:
        return None
    # CPU time where wall time is noisier; wall time on a tie (it is what a user waits for).
    clock = "cpu" if "cpu" in figures and ("wall" not in figures or figures["cpu"]["noise_rel"] <
                                            figures["wall"]["noise_rel"]) else "wall"
    chosen = dict(figures[clock])
    chosen["other"] = {c: {"noise_rel": f["noise_rel"], "ratio": f["interval"]["mean"]}
                       for c, f in figures.items() if c != clock}
    return chosen


if __name__ == "__main__":
    _child(*sys.argv[1:3])
