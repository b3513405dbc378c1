"""Two processes under torchrun (gloo on CPU) against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sdmoe.train.metrics import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # processes of their own: minutes; `make test-slow`


def _sdmoe(args, out, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", "-m", "sdmoe"] \
        if nproc > 1 else [sys.executable, "-m", "sdmoe"]
    cmd = launcher + ["train", "--preset", "tiny", "--quiet", "--method", "sd-moe", "--out", str(out),
                      "--set", "loop.monitor_every=0", "--set", "loop.threads=1"] + args
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "event" not in r]


def test_ddp_matches_single_process_and_resumes(tmp_path):
    # Both sides stop at step 12 and resume to 20 (the schedule spans 20 steps
    # once resumed), so the comparison covers DDP and resume with N processes.
    single, two = tmp_path / "single", tmp_path / "two"
    _sdmoe(["--steps", "12"], single)
    _sdmoe(["--steps", "20", "--resume"], single)
    stdout = _sdmoe(["--steps", "12"], two, nproc=2)
    assert stdout.count("trained 12 steps") == 1  # one summary: rank 0 alone reports
    _sdmoe(["--steps", "20", "--resume"], two, nproc=2)

    records = read_metrics(two / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    assert steps == sorted(set(steps)) == [5, 10, 12, 15, 20]  # rank 0 alone writes: no duplicates
    split = [r for r in records if r.get("event") == "split"]
    assert len(split) == 1 and split[0]["ranks_agree"] is True  # bases identical on both ranks
    # Same global batch: the traces agree up to float reduction order and the
    # host's balance loss, which each rank computes on its half of the batch.
    for a, b in zip(_losses(single), _losses(two), strict=True):
        assert abs(a - b) < 5e-3, (a, b)
    assert json.loads((two / "run.json").read_text())["status"] == "done"
    assert (two / "model" / "config.json").is_file()


def test_fsdp2_training_matches_single_process_resumes_and_exports(tmp_path):
    """`--set loop.parallel=fsdp`: SD-MoE split at step 0, then sharded; checkpoints hold the whole model."""
    import torch
    from transformers import AutoModelForCausalLM

    single, two = tmp_path / "single", tmp_path / "two"
    split0, fsdp = ["--set", "sdmoe.split_step=0", "--set", "loop.monitor_every=10"], ["--set", "loop.parallel=fsdp"]
    _sdmoe(split0 + ["--steps", "12"], single)
    _sdmoe(split0 + ["--steps", "20", "--resume"], single)
    _sdmoe(split0 + fsdp + ["--steps", "12"], two, nproc=2)
    _sdmoe(split0 + fsdp + ["--steps", "20", "--resume"], two, nproc=2)

    records = read_metrics(two / "metrics.jsonl")
    assert [(r["event"], r["step"]) for r in records if r.get("event") in ("split", "monitor")] == \
        [("split", 0), ("monitor", 10), ("monitor", 20)]  # rank 0 alone writes; the monitor sees every expert
    monitor = [r for r in records if r.get("event") == "monitor"][-1]
    assert monitor["sdmoe"]["layers"][0]["tails_overlap"] and "param_overlap/mean" in monitor
    for a, b in zip(_losses(single), _losses(two), strict=True):
        assert abs(a - b) < 5e-3, (a, b)
    # The final model is the whole, exported model: plain transformers loads it, and it computes
    # what the one-process model computes (up to the per-slice balance loss's effect on training).
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = [AutoModelForCausalLM.from_pretrained(d / "model", trust_remote_code=False)(input_ids=ids).logits for d in (single, two)]
    assert not any(".sdmoe." in k for k in _safetensors_keys(two / "model"))
    assert (logits[0] - logits[1]).abs().max() < 0.05 * logits[0].abs().max()
    # An FSDP2 checkpoint holds the optimizer state by parameter name: it resumes only under FSDP2.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sdmoe", "train", "--preset", "tiny", "--method", "sd-moe",
                           "--out", str(two), "--steps", "30", "--resume", *split0], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2 and "written with loop.parallel=fsdp" in done.stderr, done.stderr[-500:]


def _safetensors_keys(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_fsdp2_from_a_checkpoint_builds_on_the_meta_device_and_splits_on_shards(tmp_path, tiny_dataset):
    """`--init DIR --set loop.parallel=fsdp`: the model is built on the meta device and each rank reads only
    its slices of DIR (`from_pretrained_sharded`); SD-MoE then splits on the shards. The trace, resumed
    half-way, is the one-process run's from the same checkpoint."""
    from sdmoe.models import ModelConfig, build_model

    tok = tiny_dataset.tokenizer
    init = tmp_path / "trained-moe"
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=16)
    build_model(cfg, len(tok), seed=3, eos_token_id=tok.eos_token_id).save_pretrained(init)
    tok.save_pretrained(init)
    single, two = tmp_path / "single", tmp_path / "two"
    common = ["--init", str(init), "--set", "sdmoe.split_step=0"]
    _sdmoe(common + ["--steps", "12"], single)
    _sdmoe(common + ["--steps", "20", "--resume"], single)
    _sdmoe(common + ["--set", "loop.parallel=fsdp", "--steps", "12"], two, nproc=2)
    _sdmoe(common + ["--set", "loop.parallel=fsdp", "--steps", "20", "--resume"], two, nproc=2)
    split = [r for r in read_metrics(two / "metrics.jsonl") if r.get("event") == "split"]
    assert len(split) == 1 and split[0]["ranks_agree"] is True
    assert len(_losses(two)) == len(_losses(single)) > 0
    for a, b in zip(_losses(single), _losses(two), strict=True):
        assert abs(a - b) < 5e-3, (a, b)
    assert json.loads((two / "run.json").read_text())["status"] == "done"


def test_fsdp2_meta_init_draws_a_new_model_shard_by_shard(tmp_path, tiny_dataset):
    """`--set loop.meta_init=true` under FSDP2 (no --init): the new model is built on the meta device, each
    rank drawing its shards (`build_sharded`). It is the model `init_shards` draws in one process: that
    model saved and continued in one process (`--init`) gives the same trace."""
    from transformers import AutoModelForCausalLM

    from sdmoe.models.build import model_hf_config
    from sdmoe.train.config import preset
    from sdmoe.train.fsdp import init_shards

    cfg, tok = preset("tiny"), tiny_dataset.tokenizer
    with torch.device("meta"):
        drawn = AutoModelForCausalLM.from_config(model_hf_config(cfg.model, len(tok), tok.eos_token_id))
    drawn.to_empty(device="cpu")
    init_shards(drawn, cfg.loop.seed)
    init = tmp_path / "drawn"
    drawn.save_pretrained(init)
    tok.save_pretrained(init)
    split0 = ["--set", "sdmoe.split_step=0", "--steps", "12"]
    _sdmoe(split0 + ["--set", "loop.parallel=fsdp", "--set", "loop.meta_init=true"], tmp_path / "two", nproc=2)
    _sdmoe(split0 + ["--init", str(init)], tmp_path / "one")
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) > 0
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 5e-3, (a, b)
