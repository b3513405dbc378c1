"""FSDP2 from the meta device on 2 CPU processes: `build_sharded` draws the same model as a one-process
meta build. (`from_pretrained_sharded` is not tested yet: transformers 5 saves fused experts under
their per-expert names, which `load_shards` does not map yet.)

The file is also the worker: `torchrun --standalone --nproc-per-node 2 tests/train/test_meta_init.py OUT`."""

import os
import subprocess
import sys

import pytest
import torch


def _cfg():
    from sdmoe.models import ModelConfig

    return ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                       expert_ffn=32)


def _worker(out: str) -> None:
    import torch.distributed as dist

    from sdmoe.moe.sharding import whole
    from sdmoe.train.fsdp import build_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    drawn = {n: whole(p.detach()) for n, p in build_sharded(_cfg(), 128, seed=3).named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"drawn": drawn}, out)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_meta_device_build_matches_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from sdmoe.models.build import model_hf_config
    from sdmoe.train.fsdp import init_shards

    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model_hf_config(_cfg(), 128))
    ref.to_empty(device="cpu")
    init_shards(ref, 3)
    for name, p in ref.named_parameters():
        assert torch.equal(got["drawn"][name], p), name
    assert got["drawn"]["lm_head.weight"].std() > 0.01  # drawn, not the empty memory


if __name__ == "__main__":
    _worker(sys.argv[1])
