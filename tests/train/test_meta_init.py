"""FSDP2 from the meta device on 2 CPU processes: `build_sharded` draws the same model as a one-process
meta build, and `from_pretrained_sharded` loads, shard by shard, exactly the weights `save_pretrained` wrote
(per-expert names, Mixtral's renamed block too), and a module-list MoE (not a transformers model) loads
from its state dict's safetensors the same way, refusing, in one line, weights of another size than
their config's.

The file is also the worker: `torchrun --standalone --nproc-per-node 2 tests/train/test_meta_init.py OUT DIR...`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STYLES = ("qwen3_moe", "mixtral")
ROOT = Path(__file__).resolve().parents[2]


def _cfg(style="qwen3_moe", hidden_size=32):
    from sdmoe.models import ModelConfig

    return ModelConfig(style=style, hidden_size=hidden_size, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                       expert_ffn=32)


def _worker(out: str, dirs: list[str]) -> None:
    import torch.distributed as dist

    from sdmoe.errors import UserError
    from sdmoe.moe.sharding import local, whole
    from sdmoe.train.fsdp import build_sharded, from_pretrained_sharded, load_shards, materialize

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {"drawn": {n: whole(p.detach()) for n, p in build_sharded(_cfg(), 128, seed=3).named_parameters()}}
    *good, wrong_size = dirs
    for d in good:
        model = from_pretrained_sharded(d)
        experts = next(p for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj"))
        result[d] = {"weights": {n: whole(p.detach()) for n, p in model.named_parameters()},
                     "local_experts": local(experts.detach()).shape[0]}
    try:
        from_pretrained_sharded(wrong_size)
    except UserError as e:
        result["refused"] = str(e)
    # a module-list MoE (not a transformers model): meta device, FSDP2 (each expert Linear on its rows),
    # then its state dict's safetensors read slice by slice; its forward on the shards
    sys.path.insert(0, str(ROOT))
    from tests.method.method_helpers import ListMoEModel, batch, lm_loss

    with torch.device("meta"):
        listed = ListMoEModel()
    materialize(listed)
    load_shards(listed, Path(wrong_size).parent / "module-list")
    result["module_list"] = {n: whole(p.detach()) for n, p in listed.named_parameters()}
    result["module_list_loss"] = float(lm_loss(listed, batch()).detach())
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_meta_device_build_and_load_match_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from sdmoe.models import build_model
    from sdmoe.models.build import model_hf_config
    from sdmoe.train.fsdp import init_shards

    saved = {}
    for style in STYLES:
        saved[style] = build_model(_cfg(style), 128, seed=5)
        saved[style].save_pretrained(tmp_path / style)
    build_model(_cfg(hidden_size=48), 128).save_pretrained(tmp_path / "wider")  # weights of another size
    (tmp_path / "wider" / "config.json").write_text((tmp_path / STYLES[0] / "config.json").read_text())
    from safetensors.torch import save_file

    from ..method.method_helpers import ListMoEModel, batch, lm_loss

    torch.manual_seed(7)
    listed = ListMoEModel()
    (tmp_path / "module-list").mkdir()
    save_file({k: v.contiguous() for k, v in listed.state_dict().items()}, str(tmp_path / "module-list" / "model.safetensors"))
    out = tmp_path / "out.pt"
    dirs = [str(tmp_path / s) for s in (*STYLES, "wider")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(out), *dirs]
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

    for style, d in zip(STYLES, dirs):
        loaded = got[d]
        assert loaded["local_experts"] == 2  # 4 experts over 2 ranks: each read only its own half
        params = dict(saved[style].named_parameters())
        assert set(loaded["weights"]) == set(params)
        for name, p in params.items():
            assert torch.equal(loaded["weights"][name], p.detach()), (style, name)
    assert "another size of model" in got["refused"] and "\n" not in got["refused"]
    for name, p in listed.named_parameters():
        assert torch.equal(got["module_list"][name], p.detach()), name
    assert abs(got["module_list_loss"] - float(lm_loss(listed, batch()).detach())) < 1e-5


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
