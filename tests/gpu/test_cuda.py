"""The CUDA path against the CPU: the same step, the state moving with `.to()`, checkpoints across devices.

Marked `gpu`: skipped where torch sees no CUDA GPU; `SDMOE_GPU_TESTS_ON_CPU=1` runs them with the CPU
standing in for the GPU (a dry run of this code, done by `benchmarks/gpu_check.py --tiny` in CI).
"""

from __future__ import annotations

import json

import pytest
import torch

from sdmoe.device import autocast
from sdmoe.experiments.grid import variant_sdmoe_config
from sdmoe.method import SDMoE
from sdmoe.models import STYLES, ModelConfig, build_model
from sdmoe.moe import find_moe_blocks
from sdmoe.train.config import RunConfig, preset
from sdmoe.train.loop import train

pytestmark = pytest.mark.gpu

GPU = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only in the dry run
CPU = torch.device("cpu")
VOCAB = 256
VARIANTS = ("baseline", "sd-moe", "paper", "control")


class _Trainer:
    """A model, AdamW and (unless baseline) SD-MoE on one device, stepped by the three events."""

    def __init__(self, style: str, variant: str, device: torch.device, precision: str = "fp32"):
        cfg = ModelConfig(style=style, hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                          expert_ffn=16, aux_loss_coef=0.0)
        self.device, self.precision = device, precision
        self.model = build_model(cfg, VOCAB, seed=0, device=device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        sd = variant_sdmoe_config(variant)
        self.ctl = SDMoE(self.model, sd) if sd is not None else None
        gen = torch.Generator().manual_seed(1)
        self.batches = [torch.randint(0, VOCAB, (4, 16), generator=gen) for _ in range(3)]
        self.n = 0

    def backward(self) -> torch.Tensor:
        """Forward, backward and the gradient split; returns the loss."""
        ids = self.batches[self.n % len(self.batches)].to(self.device)
        if self.ctl is not None:
            self.ctl.before_forward(self.n, self.opt, ids)
        with autocast(self.precision, self.device):
            logits = self.model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        if self.ctl is not None:
            self.ctl.after_backward(self.n)
        return loss.detach()

    def finish_step(self) -> None:
        if self.ctl is not None:
            self.ctl.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.ctl is not None:
            self.ctl.after_optimizer_step(self.n)
        self.opt.zero_grad(set_to_none=True)
        self.n += 1

    def step(self) -> float:
        loss = self.backward()
        self.finish_step()
        return float(loss)

    def expert_grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().float().cpu() for b in find_moe_blocks(self.model) for p in b.host_parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("style", STYLES)
def test_step_matches_cpu_in_float32(style, variant):
    """The same weights, batch and variant: the split gradients and the losses of three steps agree."""
    cpu, gpu = _Trainer(style, variant, CPU), _Trainer(style, variant, GPU)
    for step in range(3):
        loss_c, loss_g = cpu.backward(), gpu.backward()
        assert abs(float(loss_c) - float(loss_g)) <= 1e-4 * abs(float(loss_c)), (step, float(loss_c), float(loss_g))
        for gc, gg in zip(cpu.expert_grads(), gpu.expert_grads()):
            assert _rel(gg, gc) < 1e-3, f"step {step}: the split gradients differ by {_rel(gg, gc):.2e}"
        if cpu.ctl is not None:
            for dc, dg in zip(cpu.ctl.parameters(), gpu.ctl.parameters()):
                assert _rel(dg.grad.float().cpu(), dc.grad.float()) < 1e-3
        cpu.finish_step()
        gpu.finish_step()


@pytest.mark.parametrize("variant", ("baseline", "sd-moe", "paper"))
@pytest.mark.parametrize("style", ("qwen2_moe", "deepseek_v3"))
def test_bf16_autocast_tracks_float32(style, variant):
    """bf16 autocast on the GPU against float32 on the CPU: losses within bf16 rounding, finite gradients."""
    cpu, gpu = _Trainer(style, variant, CPU), _Trainer(style, variant, GPU, precision="bf16")
    for _ in range(4):
        loss_c, loss_g = cpu.step(), gpu.step()
        assert abs(loss_c - loss_g) <= 2e-2 * abs(loss_c), (loss_c, loss_g)
    for p in gpu.model.parameters():
        assert p.dtype == torch.float32  # autocast computes in bf16; the weights stay float32


@pytest.mark.parametrize("variant", ("sd-moe", "paper"))
def test_the_split_adds_no_host_sync(variant):
    """After the forward and backward, SD-MoE's events, clipping and AdamW never make the host wait."""
    t = _Trainer("qwen3_moe", variant, GPU)
    for _ in range(2):
        t.step()
    t.backward()
    if GPU.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        t.ctl.after_backward(t.n)
        t.finish_step()
    finally:
        if GPU.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert t.n == 3


@pytest.mark.parametrize("variant", ("sd-moe", "paper", "per-expert"))
def test_sdmoe_state_moves_with_to(variant):
    """Split on the CPU, move model, optimizer and SD-MoE to the GPU and back: every step matches the
    run that never moved."""
    stay, move = _Trainer("qwen2_moe", variant, CPU), _Trainer("qwen2_moe", variant, CPU)
    stay.step(), move.step()
    for device in (GPU, CPU):
        move.model.to(device)
        move.opt.load_state_dict(move.opt.state_dict())  # torch moves optimizer state to its parameters' device
        move.ctl.to(device)
        move.device = device
        assert all(t.device.type == device.type for t in move.ctl.buffers() + move.ctl.parameters())
        assert abs(stay.step() - move.step()) <= 1e-4 * 10
    for a, b in zip(stay.model.parameters(), move.model.parameters()):
        assert _rel(b.detach(), a.detach()) < 1e-4


def _tiny(method: str, device: torch.device, steps: int = 12) -> RunConfig:
    cfg = preset("tiny")
    cfg.method = method
    cfg.loop.steps, cfg.loop.checkpoint_every, cfg.loop.monitor_every = steps, 6, 0
    cfg.loop.device, cfg.loop.precision = str(device), "fp32"
    return cfg


@pytest.mark.parametrize("first,second", [(GPU, CPU), (CPU, GPU)], ids=["gpu-then-cpu", "cpu-then-gpu"])
def test_checkpoint_resumes_on_the_other_device(tmp_path, tiny_dataset, first, second):
    """A run stopped after a checkpoint on one device resumes on the other and ends where an
    uninterrupted run ends (float32 both sides: rounding differences only)."""
    whole = train(_tiny("sd-moe", first), tmp_path / "whole", progress=False, dataset=tiny_dataset)
    train(_tiny("sd-moe", first), tmp_path / "moved", progress=False, stop_after=6, dataset=tiny_dataset)
    moved = train(_tiny("sd-moe", second), tmp_path / "moved", resume=True, progress=False,
                  dataset=tiny_dataset)
    assert moved.steps == whole.steps == 12
    assert abs(moved.val_loss["mean"] - whole.val_loss["mean"]) < 1e-3


def test_training_on_the_gpu_defaults_to_bf16_and_grouped_mm(tmp_path, tiny_dataset):
    """`loop.device=auto` on a GPU machine: the run trains there, under bf16 autocast, with the grouped
    expert kernel, and the saved model loads in plain transformers on the CPU."""
    from transformers import AutoModelForCausalLM

    cfg = preset("tiny")
    cfg.method, cfg.loop.monitor_every = "sd-moe", 5
    result = train(cfg, tmp_path / "run", progress=False, dataset=tiny_dataset)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    assert losses and all(map(lambda v: v == v and abs(v) < 100, losses))
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)  # on the CPU
    assert next(model.parameters()).device.type == "cpu"
    if GPU.type == "cuda":
        assert result.val_loss["mean"] < 7.0
        built = build_model(cfg.model, 512, device="cuda")
        assert built.config._experts_implementation == "grouped_mm"


def test_claim_e_is_timed_on_the_runs_device(tiny_dataset):
    """The compare's step-time measurement (claim (e)) trains on the runs' own device and precision, and
    on a GPU judges by wall time only (the host's CPU time is not the step's work)."""
    from sdmoe.experiments.timing import _one_process, analyze

    configs = {name: _tiny(name, GPU) for name in ("baseline", "sd-moe")}
    for cfg in configs.values():
        cfg.loop.precision = "auto"
    sample = _one_process(configs, tiny_dataset, rounds=2)
    assert sample["device"] == str(GPU)
    assert all(len(sample[clock][side]) == 2 for clock in ("wall", "cpu") for side in configs)
    figures = analyze({"qwen2_moe": {"version": 2, "processes": [sample, sample]}})
    assert figures["clock"] == ("wall" if GPU.type == "cuda" else figures["clock"])
