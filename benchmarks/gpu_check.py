"""The GPU check: SD-MoE measured at GPU scale by one prepared script, in under 8 minutes on one GPU.

    python benchmarks/gpu_check.py --out runs/gpu-check           # on a GPU: the `gpu` preset (0.71B parameters)
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu-check    # anywhere: tiny sizes, under a minute on CPU (CI)

Writes, section by section (a run stopped at its time limit keeps what it measured):
  OUT/gpu_check.json   every figure below, with the device, torch, CUDA and transformers versions
  OUT/gpu_check.md     the same as a short Markdown summary
  OUT/gpu_tests.log    the output of the `gpu` test subset
  OUT/loss_curves.png  the training section's loss curves

Sections:
  1. device    name, memory, versions
  2. tests     `pytest -m gpu tests/gpu` (CUDA against the CPU); with --tiny on a CPU, their dry run
  3. kernels   transformers' expert kernels (eager, batched_mm, grouped_mm), forward + backward of one
               MoE layer of the preset under the run's precision; the fastest is used below
  4. memory    each side's peak device memory over training steps (torch.cuda.max_memory_allocated,
               counted from before the side was built: weights, gradients, optimizer and SD-MoE state,
               activations); the CPU has no such counter (benchmarks/bench_method.py measures RSS)
  5. step time the plain MoE, the default SD-MoE and the paper's own split, stepped in turn (A B C A B C
               ...) in this process; the device is synchronised at each phase boundary. Paired ratios
               (median and quartiles over the rounds), tokens/s, and the split's share of the step
  6. compile   `torch.compile(model)` of the whole model after `sdmoe.attach` (the split inside the compiled
               run) against the same steps eager: loss and weight gaps, graphs, each step's seconds. The tiny
               preset's shapes on every device (a check that the method stays outside the graph, not a speed
               figure at scale); inductor on CUDA, aot_eager on the CPU (inductor's C++ build is minutes)
  7. training  baseline, default and `paper` trained by `sdmoe train`'s own loop from the same seed on
               the bundled corpora, as many steps as the time left allows (at most --train-steps);
               validation loss curves. A speed and sanity check at an untuned rate, one seed: not evidence
               of a gain (docs/results.md says what is)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_method import Side, build, forward_backward, interleave, median_ms, shapes, split_breakdown  # noqa: E402

from sdmoe.device import describe, resolve_device, synchronize, uses_bf16  # noqa: E402
from sdmoe.experiments.grid import variant_sdmoe_config  # noqa: E402
from sdmoe.method import SDMoEConfig  # noqa: E402
from sdmoe.models import ModelConfig, build_model  # noqa: E402
from sdmoe.moe import find_moe_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("baseline", "sd-moe", "paper")
KERNELS = ("eager", "batched_mm", "grouped_mm")


class Check:
    """The record: every section writes its part and both files are rewritten at once."""

    def __init__(self, out: Path, budget_s: float, tiny: bool):
        self.out, self.budget_s, self.tiny = out, budget_s, tiny
        self.t0 = time.perf_counter()
        # an infinite budget (`--budget-s inf`: the CPU test's way, where a loaded machine must not turn a slow
        # section into a skip or a timeout) is recorded as none
        self.data: dict = {"tiny": tiny, "budget_s": budget_s if math.isfinite(budget_s) else None, "sections": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, need_s: float = 0.0) -> None:
        """Section `name`: its result, or the reason it has none (an error, or too little time left)."""
        t = time.perf_counter()
        if self.left() < need_s:
            result = {"skipped": f"{self.left():.0f} s left of the {self.budget_s:.0f} s budget, {need_s:.0f} s needed"}
        else:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - one broken section must not cost the others
                result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        self.data["sections"][name] = result
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        print(f"[{self.data['elapsed_s']:6.1f} s] {name}: " + json.dumps(_short(result))[:400], flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def _short(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("traceback", "curves", "output_tail", "rounds")}


# -- sections ------------------------------------------------------------------------------------


def device_section(device: torch.device) -> dict:
    import transformers

    import sdmoe

    return {**describe(device), "transformers": transformers.__version__, "sdmoe": sdmoe.__version__,
            "commit": _git_commit()}


def _git_commit() -> str | None:
    if os.environ.get("SDMOE_COMMIT"):  # a copy of the tree without .git (a lent GPU machine) is told it
        return os.environ["SDMOE_COMMIT"]
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return res.stdout.strip() or None
    except OSError:
        return None


def tests_section(check: Check, device: torch.device) -> dict:
    env = dict(os.environ)
    if device.type != "cuda":
        env["SDMOE_GPU_TESTS_ON_CPU"] = "1"  # the dry run: the CPU stands in for the GPU
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    if check.tiny:  # CI's dry run in under a minute: the step-match test on two styles (the same code for all six)
        cmd += ["-k", "not test_step_matches_cpu_in_float32 or qwen2_moe or deepseek_v3"]
    left = check.left()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=max(30.0, left - (15 if check.tiny else 240)) if math.isfinite(left) else None)
    output = res.stdout + res.stderr
    (check.out / "gpu_tests.log").write_text(output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return {"on": "cuda" if device.type == "cuda" else "cpu (dry run)", "returncode": res.returncode,
            "summary": lines[-1] if lines else "", "output_tail": output[-2000:]}


def kernels_section(s: dict, device: torch.device, precision: str, repeats: int) -> dict:
    """Forward + backward of one MoE layer's experts at the preset's shapes, per kernel (median ms)."""
    from sdmoe.device import autocast

    tokens = s["batch"] * s["seq"]
    cfg = ModelConfig(style=s["style"], hidden_size=s["d"], num_layers=1, num_heads=s["heads"],
                      num_experts=s["experts"], top_k=s["top_k"], expert_ffn=s["f"], shared_expert_ffn=s["shared_f"])
    experts = find_moe_blocks(build_model(cfg, 256, device=device))[0].experts
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(tokens, s["d"], generator=gen).to(device).requires_grad_()
    logits_TE = torch.randn(tokens, s["experts"], generator=gen).to(device)
    weights_TK, index_TK = torch.softmax(logits_TE, -1).topk(s["top_k"], dim=-1)
    out: dict = {"tokens": tokens, "ms": {}, "errors": {}}
    for impl in KERNELS:
        # batched_mm copies a weight matrix per (token, expert) pair: skip it where that alone passes 4 GiB
        if impl == "batched_mm" and tokens * s["top_k"] * 3 * s["f"] * s["d"] * 4 > 4 * 2**30:
            out["errors"][impl] = "skipped: its per-token weight copies would pass 4 GiB"
            continue
        experts.config._experts_implementation = impl

        def step():
            with autocast(precision, device):
                y = experts(x_TD, index_TK, weights_TK)
            y.float().square().mean().backward()

        try:
            samples = []
            for i in range(repeats + 2):
                synchronize(device)
                t = time.perf_counter()
                step()
                synchronize(device)
                if i >= 2:  # two warm-up calls
                    samples.append(time.perf_counter() - t)
            out["ms"][impl] = round(1e3 * statistics.median(samples), 3)
        except Exception as e:  # noqa: BLE001 - a kernel may not exist for this device or dtype
            out["errors"][impl] = f"{type(e).__name__}: {str(e)[:200]}"
    if out["ms"]:
        out["fastest"] = min(out["ms"], key=out["ms"].get)
    return out


def memory_section(sides: dict, s: dict, device: torch.device, precision: str) -> dict:
    """Build each side in turn and measure its peak device memory; the sides stay built for the timing."""
    out: dict = {}
    for name in SIDES:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        side = Side(s, variant_sdmoe_config(name), lr=1e-3, device=device, precision=precision)
        side.step()  # optimizer state and the split's parts exist from here
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            side.step()
        sides[name] = side
        if device.type == "cuda":
            out[name] = {"peak_gib": round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)}
    if device.type != "cuda":
        return {"skipped": "no device-memory counter on the CPU (benchmarks/bench_method.py measures RSS)"}
    for name in SIDES[1:]:
        out[f"{name}/baseline"] = round(out[name]["peak_gib"] / out["baseline"]["peak_gib"], 4)
    return out


def step_time_section(sides: dict, s: dict, warmup: int, rounds: int) -> dict:
    times = interleave(sides, warmup, rounds)
    med = median_ms(times)
    tokens = s["batch"] * s["seq"]
    out: dict = {"rounds": rounds, "warmup": warmup, "tokens_per_step": tokens, "median_ms": med,
                 "tokens_per_s": {n: round(tokens / (m["total"] / 1e3)) for n, m in med.items()}}
    for name in SIDES[1:]:
        ratios = sorted(b["total"] / a["total"] for a, b in zip(times["baseline"], times[name]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        out[f"{name}/baseline"] = {"median": round(statistics.median(ratios), 4), "q1": round(q[0], 4),
                                   "q3": round(q[2], 4), "tokens_per_s_ratio": round(
                                       out["tokens_per_s"][name] / out["tokens_per_s"]["baseline"], 4)}
        # the method's own phases: the split in the step's pre-hooks (the clip there too, the baseline's alone
        # taken off), the shared step and fold in its post-hooks
        own = sum(med[name][ph] - med["baseline"][ph] for ph in ("split", "after_step"))
        out[f"{name}/split_share"] = round(own / med[name]["total"], 4)
    out["sd-moe/split_parts_ms"] = {k: round(v, 3) for k, v in split_breakdown(sides["sd-moe"], reps=5).items()}
    return out


def compile_section(device: torch.device, steps: int = 6, split_step: int = 2) -> dict:
    """SD-MoE in a plain loop, the whole model compiled after `attach`, against the same loop eager (float32)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import sdmoe

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    s = shapes("tiny")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device) for _ in range(steps)]
    runs: dict = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()  # the compiled run compiles from scratch
        counters.clear()
        model = build(s, device)
        start = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        handle = sdmoe.attach(model, opt, SDMoEConfig(split_step=split_step), max_norm=1.0)
        run = torch.compile(model, backend=backend) if mode == "compiled" else model
        losses, seconds = [], []
        for ids in batches:
            synchronize(device)
            t = time.perf_counter()
            losses.append(float(forward_backward(run, ids, "fp32")))
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            seconds.append(time.perf_counter() - t)
        runs[mode] = {"losses": losses, "seconds": seconds, "split": handle.controller.split_done,
                      "weights": [p.detach() for p in model.parameters()], "start": start}
    eager, comp = runs["eager"], runs["compiled"]
    weight_gap = max(float((a - b).norm() / (b - s0).norm().clamp_min(1e-30))
                     for a, b, s0 in zip(comp["weights"], eager["weights"], eager["start"]))
    # each step's seconds: the compiled run's first steps compile, and transformers' experts recompile while the
    # tokens per expert change shape (the plain model's graphs as well): a path check, not a speed figure
    return {"backend": backend, "steps": steps, "split_step": split_step, "split_in_compiled_run": comp["split"],
            "max_rel_loss_gap": max(abs(a - b) / abs(b) for a, b in zip(comp["losses"], eager["losses"])),
            "weight_gap_over_change": weight_gap, "graphs": counters["stats"]["unique_graphs"],
            "step_s": {m: [round(t, 3) for t in r["seconds"]] for m, r in runs.items()}}


def training_section(check: Check, device: torch.device, kernel: str, max_steps: int, step_s: float) -> dict:
    """Baseline, default and `paper` trained by the real loop from one seed; as many steps as time allows."""
    from sdmoe.experiments.grid import variant_overrides
    from sdmoe.train.config import preset, set_value
    from sdmoe.train.loop import train

    base = preset("tiny" if check.tiny else "gpu")
    overhead_s = 5.0 if check.tiny else 40.0  # build, evaluation, checkpoint and final model per run
    left = check.left()
    affordable = (int((left - (3 if check.tiny else 20) - 3 * overhead_s) / (3 * 1.2 * max(step_s, 1e-3)))
                  if math.isfinite(left) else max_steps)
    steps = min(max_steps, affordable)
    if steps < 20:
        return {"skipped": f"{check.left():.0f} s left: too little for 3 runs of 20 steps at {step_s:.2f} s a step"}
    runs: dict = {}
    curves: dict = {}
    # checkpoints of a 0.7B model are gigabytes: in memory where the machine has a tmpfs
    work = Path(tempfile.mkdtemp(prefix="gpu-check-train-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    for name in SIDES:
        cfg = preset("tiny" if check.tiny else "gpu")
        for key, value in variant_overrides(name).items():
            set_value(cfg, key, value)
        cfg.name = name
        cfg.loop.steps, cfg.loop.checkpoint_every, cfg.loop.keep_checkpoints = steps, steps, 1
        cfg.loop.eval_every, cfg.loop.log_every, cfg.loop.monitor_every = max(5, steps // 8), 5, 0
        cfg.loop.device = str(device)
        cfg.model.experts_implementation = kernel
        cfg.optim.warmup_steps = min(base.optim.warmup_steps, steps // 10)
        if name == "sd-moe":
            cfg.sdmoe.split_step = max(1, steps // 6)  # a warm-up before the split, as the default's runs have
        t = time.perf_counter()
        result = train(cfg, work / name, progress=False)
        runs[name] = {"val_loss": round(result.val_loss["mean"], 4), "seconds": round(time.perf_counter() - t, 1)}
        records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = {"train": [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r],
                        "val": [(r["step"], r["val"]["mean"]) for r in records if r.get("event") == "eval"]}
        runs[name]["tokens_per_s"] = round(statistics.median(
            r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 10) if steps > 15 else 0)
        shutil.rmtree(work / name, ignore_errors=True)
    for name in SIDES[1:]:
        runs[f"{name} gain (baseline - it)"] = round(runs["baseline"]["val_loss"] - runs[name]["val_loss"], 4)
    plot_curves(curves, check.out / "loss_curves.png", steps)
    return {"preset": "tiny" if check.tiny else "gpu", "steps": steps, "lr": base.optim.lr,
            "tokens_per_step": base.data.batch_size * base.data.seq_len, "runs": runs, "curves": curves}


def plot_curves(curves: dict, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        if c["train"]:
            a.plot(*zip(*c["train"]), label=name, lw=1)
        if c["val"]:
            b.plot(*zip(*c["val"]), marker="o", label=name)
    a.set(title="training loss", xlabel="step", ylabel="nats/token")
    b.set(title="validation loss (mean over domains)", xlabel="step")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"same seed, {steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the summary -----------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    sec = data["sections"]
    dev = sec.get("device", {})
    lines = [f"# GPU check{' (tiny sizes)' if data['tiny'] else ''}", "",
             f"{dev.get('name', '?')} ({dev.get('device', '?')}), torch {dev.get('torch', '?')}, CUDA "
             f"{dev.get('cuda', '-')}, transformers {dev.get('transformers', '?')}, sdmoe {dev.get('sdmoe', '?')} "
             f"at {dev.get('commit', '?')}; {data.get('elapsed_s', 0):.0f} s"
             + (f" of a {data['budget_s']:.0f} s budget." if data["budget_s"] is not None else ", no time budget."), ""]
    for name, res in sec.items():
        if name == "device":
            continue
        lines.append(f"## {name}")
        if "skipped" in res or "error" in res:
            lines += [f"{'skipped' if 'skipped' in res else 'error'}: {res.get('skipped') or res.get('error')}", ""]
            continue
        if name == "tests":
            lines.append(f"on {res['on']}: `{res['summary']}` (exit {res['returncode']}; gpu_tests.log)")
        elif name == "kernels":
            lines.append(f"{res['tokens']} tokens, forward + backward of one layer's experts: " + ", ".join(
                f"{k} {v:.2f} ms" for k, v in res["ms"].items()) + f"; fastest: **{res.get('fastest')}**"
                + "".join(f"; {k}: {v}" for k, v in res["errors"].items()))
        elif name == "memory":
            lines.append("| side | peak GiB | / baseline |\n|---|---|---|")
            for side in SIDES:
                ratio = res.get(f"{side}/baseline", 1.0)
                lines.append(f"| {side} | {res[side]['peak_gib']:.2f} | {ratio:.3f} |")
        elif name == "step time":
            lines.append(f"{res['rounds']} interleaved rounds after {res['warmup']} warm-up, "
                         f"{res['tokens_per_step']} tokens a step")
            lines.append("| side | median step ms | tokens/s | step-time ratio to baseline [quartiles] | "
                         "split's share of the step |\n|---|---|---|---|---|")
            for side in SIDES:
                m = res["median_ms"][side]["total"]
                r = res.get(f"{side}/baseline")
                ratio = f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]" if r else "1"
                share = f"{100 * res[f'{side}/split_share']:.1f}%" if r else "-"
                lines.append(f"| {side} | {m:.1f} | {res['tokens_per_s'][side]:,} | {ratio} | {share} |")
            lines.append("\nthe default's split, each part alone: " + ", ".join(
                f"{k} {v:.2f}" for k, v in res["sd-moe/split_parts_ms"].items()))
        elif name == "compile":
            lines.append(f"`torch.compile(model)` ({res['backend']}, {res['graphs']} graphs) after `sdmoe.attach`, "
                         f"split at step {res['split_step']} of {res['steps']} (split: {res['split_in_compiled_run']})"
                         f": largest relative loss gap to eager {res['max_rel_loss_gap']:.1e}, weights' gap over "
                         f"their change {res['weight_gap_over_change']:.1e}; seconds a step, compiled "
                         f"{res['step_s']['compiled']}, eager {res['step_s']['eager']}")
        elif name == "training":
            lines.append(f"`{res['preset']}` preset, {res['steps']} steps of {res['tokens_per_step']} tokens, lr "
                         f"{res['lr']:g} (untuned), one seed: a speed and sanity check, not evidence of a gain")
            lines.append("| run | validation loss | tokens/s | seconds |\n|---|---|---|---|")
            for side in SIDES:
                r = res["runs"][side]
                lines.append(f"| {side} | {r['val_loss']:.4f} | {r['tokens_per_s']:,} | {r['seconds']:.0f} |")
            lines.append("\n" + "; ".join(f"{k}: {v:+.4f}" for k, v in res["runs"].items() if "gain" in k)
                         + " (loss_curves.png)")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu-check", help="where gpu_check.json, gpu_check.md and the rest go")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the `tiny` preset): the whole check on a CPU")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="time for the whole check; later sections shrink or skip to fit (default 450, 60 with --tiny; "
                         "inf: no budget, nothing skipped or timed out)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="the training section's steps at most (default 300, 40 with --tiny)")
    ap.add_argument("--no-tests", action="store_true", help="skip the gpu test subset")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    args = ap.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s or (60.0 if args.tiny else 450.0), args.tiny)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("SDMOE_CACHE", str(out / ".cache"))  # tokenizers and token ids of this check
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS where a test asks for it
    precision = "auto"
    s = shapes("tiny" if args.tiny else "gpu")
    check.data["precision"] = "bf16 autocast" if uses_bf16(precision, device) else "float32"
    check.data["shapes"] = s
    check.run("device", lambda: device_section(device))
    if not args.no_tests:
        check.run("tests", lambda: tests_section(check, device), need_s=30)
    check.run("kernels", lambda: kernels_section(s, device, precision, repeats=5 if args.tiny else 10))
    s["kernel"] = check.data["sections"]["kernels"].get("fastest", "auto")
    sides: dict = {}
    check.run("memory", lambda: memory_section(sides, s, device, precision), need_s=20)
    if len(sides) == len(SIDES):
        check.run("step time", lambda: step_time_section(sides, s, warmup=2, rounds=4 if args.tiny else 12),
                  need_s=20)
    step = check.data["sections"].get("step time", {}).get("median_ms", {})
    step_s = statistics.mean(v["total"] for v in step.values()) / 1e3 if step else 1.0
    sides.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_compile:
        check.run("compile", lambda: compile_section(device), need_s=20 if args.tiny else 90)
    max_steps = args.train_steps or (40 if args.tiny else 300)
    check.run("training", lambda: training_section(check, device, s["kernel"], max_steps, step_s),
              need_s=10 if args.tiny else 60)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [n for n, r in check.data["sections"].items() if "error" in r or r.get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
