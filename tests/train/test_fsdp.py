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
# name -> SD-MoE settings (None: the plain model); every one split before sharding (split_step=0)
VARIANTS = {
    "baseline": None,
    "none": dict(gradient_split="none"),
    "per_step": dict(gradient_split="per_step", exact_every=3, tracker_oversample=2),
    "fixed": dict(gradient_split="fixed"),
    "lowrank": dict(form="lowrank", gradient_split="fixed"),
    "gate_only": dict(projections=("gate",)),
}


def run(world: int, rank: int, variant: str) -> dict:
    """A few AdamW steps of a tiny qwen3_moe -> {losses, q (tracked bases), monitor}."""
    import torch.distributed as dist

    from sdmoe.analysis.monitor import spectral_snapshot
    from sdmoe.method import SDMoE, SDMoEConfig
    from sdmoe.models import ModelConfig, build_model
    from sdmoe.train.fsdp import shard_model

    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=32)
    model = build_model(cfg, vocab_size=256, seed=0)
    ctl = None
    if VARIANTS[variant] is not None:
        ctl = SDMoE(model, SDMoEConfig(split_step=0, rank=4, **VARIANTS[variant]))
        ctl.split()
    if world > 1:
        shard_model(model, controller=ctl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if ctl is not None:
        ctl.bind_optimizer(opt)
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
            ctl.clip_grad_norm_(1e9)  # the norm path the loop takes (DTensor and plain gradients), no clipping
        if step == STEPS - 1:  # as the training loop does: weights and this step's gradients
            snapshot = spectral_snapshot(model, 4)
        opt.step()
        opt.zero_grad()
        if ctl is not None:
            ctl.after_optimizer_step(step)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    out = {"losses": losses, "snapshot": snapshot}
    if ctl is not None:
        out["q"] = [q.tolist() for layer in ctl.layers for q in layer.q.values()]
        out["monitor"] = ctl.monitor(4)["layers"]  # collective under FSDP2: every rank calls it
    return out


def _worker(out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = {v: run(world, rank, v) for v in VARIANTS}
    except (NotImplementedError, RuntimeError) as e:  # only a backend/device refusal is "unsupported"
        msg = str(e).splitlines()[0]
        if any(s in msg.lower() for s in ("gloo", "backend", "not supported", "cpu")):
            if rank == 0:
                print(f"FSDP2 unsupported here: {type(e).__name__}: {msg}", file=sys.stderr)
            dist.destroy_process_group()
            sys.exit(UNSUPPORTED)
        raise
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(every, f)
    dist.destroy_process_group()


def _close(a, b, tol: float) -> bool:
    return bool(torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol))


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tmp_path):
    """Plain and every SD-MoE gradient split on 2 FSDP2 processes: the one-process losses, the same
    tracked bases on both ranks (and as one process), the monitor seeing all experts."""
    torch.set_num_threads(1)
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode == UNSUPPORTED or "exitcode  : 3" in done.stderr:
        pytest.skip(next(line for line in done.stderr.splitlines() if "FSDP2 unsupported" in line))
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    for variant in VARIANTS:
        one, two = run(1, 0, variant), rank0[variant]
        assert len(two["losses"]) == STEPS
        assert _close(one["losses"], two["losses"], 1e-4), (variant, one["losses"], two["losses"])
        assert one["snapshot"].keys() == two["snapshot"].keys() == rank1[variant]["snapshot"].keys()
        assert any(k.startswith("grad_overlap/") for k in one["snapshot"])  # a plain model: its gradients too
        assert _close(list(one["snapshot"].values()), list(two["snapshot"].values()), 1e-3), variant
        if "q" in one:
            assert two["q"] == rank1[variant]["q"]  # bit-identical bases on every rank
            assert _close(one["q"], two["q"], 1e-3), variant  # the one-process tracker's subspace
            assert two["monitor"] == rank1[variant]["monitor"]  # every rank sees every expert
            for a, b in zip(one["monitor"], two["monitor"], strict=True):
                for key in ("experts_overlap", "tails_overlap"):
                    assert _close(list(a[key].values()), list(b[key].values()), 1e-3), (variant, key, a, b)
    losses = {v: tuple(rank0[v]["losses"]) for v in VARIANTS}
    assert len(set(losses.values())) == len(VARIANTS)  # each variant trains differently: none is a no-op


def test_shard_model_refuses_what_fsdp2_cannot_run():
    from sdmoe.errors import UserError
    from sdmoe.method import SDMoE, SDMoEConfig
    from sdmoe.models import ModelConfig, build_model
    from sdmoe.train.fsdp import check_sdmoe, shard_model

    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_experts=4, expert_ffn=32), 64)
    ctl = SDMoE(model, SDMoEConfig(split_step=0, gradient_split="fixed", rank=4, reestimate_every=5))
    with pytest.raises(UserError, match="after the SD-MoE split"):
        check_sdmoe(ctl)
    ctl.split()
    with pytest.raises(UserError, match="reestimate_every=5"):
        shard_model(model, controller=ctl)
    ctl.cfg.reestimate_every = 0
    check_sdmoe(ctl)  # the fixed split itself runs on shards
    with pytest.raises(UserError, match="process group"):
        shard_model(model)


def test_fsdp2_refuses_the_split_on_module_list_experts():
    from sdmoe.errors import UserError
    from sdmoe.method import SDMoE, SDMoEConfig
    from sdmoe.train.fsdp import check_sdmoe

    from ..method.method_helpers import make_model

    ctl = SDMoE(make_model("module_list"), SDMoEConfig(split_step=0, rank=4))
    ctl.split()
    with pytest.raises(UserError, match="needs fused experts under FSDP2"):
        check_sdmoe(ctl)
    # the control too: its shared gradient sums whole experts, which FSDP2 shards row by row here
    control = SDMoE(make_model("module_list"), SDMoEConfig(split_step=0, rank=4, gradient_split="none"))
    control.split()
    with pytest.raises(UserError, match="needs fused experts under FSDP2"):
        check_sdmoe(control)


def test_meta_device_helpers_refuse_what_they_cannot_fill(tmp_path):
    from torch import nn

    from sdmoe.errors import UserError
    from sdmoe.method import SDMoE, SDMoEConfig
    from sdmoe.models import ModelConfig, build_model
    from sdmoe.train.fsdp import check_sdmoe, init_shards, load_shards, materialize

    with pytest.raises(UserError, match="takes a transformers model"):
        init_shards(nn.Linear(2, 2), 0)
    from safetensors.torch import save_file

    save_file(nn.Linear(2, 3).state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="another size of model"):
        load_shards(nn.Linear(2, 2), tmp_path)  # any module loads from its state dict's names, checked
    with pytest.raises(UserError, match="has no tensor"):
        load_shards(nn.Sequential(nn.Linear(2, 3)), tmp_path)  # its names are 0.weight, 0.bias
    plain = nn.Linear(2, 3)
    load_shards(plain, tmp_path)  # unsharded: the whole tensors
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_experts=4, expert_ffn=32), 64)
    with pytest.raises(UserError, match="already has weights"):
        materialize(model)
    later = SDMoE(model, SDMoEConfig(split_step=5, rank=4))
    with pytest.raises(UserError, match="set sdmoe.split_step=0"):
        check_sdmoe(later, split_on_shards=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
