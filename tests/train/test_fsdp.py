"""FSDP2 (fully_shard) on 2 CPU processes (gloo) against one process with the same global batch.

The file is also the worker: `torchrun --standalone --nproc-per-node 2 tests/train/test_fsdp.py OUT`."""

import json
import os
import subprocess
import sys

import pytest
import torch

STEPS, BATCH = 4, 4
UNSUPPORTED = 3  # the worker's exit code when this torch build cannot run fully_shard on CPU/gloo


def run_losses(world: int, rank: int, sdmoe: bool) -> list[float]:
    """A few AdamW steps of a tiny qwen3_moe (plain, or SD-MoE split before sharding, gradient_split='none')."""
    import torch.distributed as dist

    from sdmoe.method import SDMoE, SDMoEConfig
    from sdmoe.models import ModelConfig, build_model
    from sdmoe.train.fsdp import shard_model

    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=32)
    model = build_model(cfg, vocab_size=256, seed=0)
    ctl = None
    if sdmoe:
        ctl = SDMoE(model, SDMoEConfig(split_step=0, gradient_split="none", rank=4))
        ctl.split()
    if world > 1:
        shard_model(model, controller=ctl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    per = BATCH // world
    losses = []
    for step in range(STEPS):
        ids = torch.randint(0, 256, (BATCH, 16), generator=g)[rank * per:(rank + 1) * per]
        logits = model(input_ids=ids).logits  # LM loss alone: the host's balance loss is per-slice
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if ctl is not None:
            ctl.after_backward(step)
        opt.step()
        opt.zero_grad()
        if ctl is not None:
            ctl.after_optimizer_step(step)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def _worker(out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = {"baseline": run_losses(world, rank, False), "sdmoe_none": run_losses(world, rank, True)}
    except (NotImplementedError, RuntimeError) as e:  # only a backend/device refusal is "unsupported"
        msg = str(e).splitlines()[0]
        if any(s in msg.lower() for s in ("gloo", "backend", "not supported", "cpu")):
            if rank == 0:
                print(f"FSDP2 unsupported here: {type(e).__name__}: {msg}", file=sys.stderr)
            dist.destroy_process_group()
            sys.exit(UNSUPPORTED)
        raise
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "losses.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode == UNSUPPORTED or "exitcode  : 3" in done.stderr:
        pytest.skip(next(line for line in done.stderr.splitlines() if "FSDP2 unsupported" in line))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    for key, sdmoe in (("baseline", False), ("sdmoe_none", True)):
        one = run_losses(1, 0, sdmoe)
        assert len(two[key]) == STEPS
        for a, b in zip(one, two[key], strict=True):
            assert abs(a - b) < 1e-4, (key, one, two[key])
    assert two["baseline"] != two["sdmoe_none"]  # the split model is a different model, not a no-op


def test_shard_model_refuses_what_fsdp2_cannot_run():
    from sdmoe.errors import UserError
    from sdmoe.method import SDMoE, SDMoEConfig
    from sdmoe.models import ModelConfig, build_model
    from sdmoe.train.fsdp import check_sdmoe, shard_model

    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_experts=4, expert_ffn=32), 64)
    ctl = SDMoE(model, SDMoEConfig(split_step=0, gradient_split="fixed", rank=4))
    with pytest.raises(UserError, match="after the SD-MoE split"):
        check_sdmoe(ctl)
    ctl.split()
    with pytest.raises(UserError, match="gradient_split='fixed'"):
        shard_model(model, controller=ctl)
    with pytest.raises(UserError, match="process group"):
        shard_model(model)


if __name__ == "__main__":
    _worker(sys.argv[1])
