"""Expert parallelism on 2 and 4 CPU processes (gloo) against one process with the same global batch.

transformers' own EP (`sdmoe.train.expert_parallel`): every rank owns E / ep whole experts, its
tokens travel to their experts' rank and back by all-to-all, everything else is FSDP2 over all
ranks; with 4 processes and ep=2 the experts sit on a 2-D mesh (efsdp=2 x ep=2). SD-MoE splits on
the sharded model (its state built from local shards) and runs through `sdmoe.attach`. Checked
after every step, for the plain model, the default split, the paper's and the control: the
gradients after the split, the tracked bases, the shared parts, the losses, and at the end every
weight; all equal the one-process run to 1e-6.

A reducer that sums over the local experts only (each rank splitting in a basis of its own
experts, nothing crashing) fails this test: `test_a_local_only_reducer_is_caught` runs it.

The file is also the worker: `torchrun --standalone --nproc-per-node N -m tests.train.test_expert_parallel EP OUT`.
"""

import sys

import pytest
import torch

from tests.ep_helpers import TOL, VARIANTS, compare, gap, launch, record_split_state, worker

STEPS, BATCH, VOCAB = 4, 4, 128


def _model():
    from sdmoe.models import ModelConfig, build_model

    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=32)
    return build_model(cfg, vocab_size=VOCAB, seed=0)


def run(world: int, rank: int, ep: int, variant: str) -> dict:
    """STEPS AdamW steps, clipped, through `sdmoe.attach`; every recorded tensor whole, as lists."""
    import sdmoe
    from sdmoe.moe.sharding import whole
    from sdmoe.train.expert_parallel import expert_parallel

    model = _model()
    if world > 1:
        expert_parallel(model, ep_size=ep)
    # SGD with momentum: the one-process run and the sharded one differ only in the order of their float32
    # sums (~1e-9), which AdamW's 1/sqrt(v) would blow up to ~1e-5 on near-zero gradient entries
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    settings = VARIANTS[variant]
    handle = sdmoe.attach(model, opt, None if settings is None else sdmoe.SDMoEConfig(**settings), max_norm=1.0)
    record = {"losses": [], "split_grads": [], "q": [], "shared": []}

    def after_split(optimizer, args, kwargs):  # runs after the driver's pre-hook: the split, clipped gradients
        record["split_grads"].append([whole(p.grad).tolist() for n, p in model.named_parameters() if "experts" in n])

    opt.register_step_pre_hook(after_split)
    ids_all = torch.randint(0, VOCAB, (STEPS, BATCH, 16), generator=torch.Generator().manual_seed(0))
    per = BATCH // world
    for step in range(STEPS):
        ids = ids_all[step, rank * per:(rank + 1) * per]
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(value)
            value /= world
        record["losses"].append(float(value))
        if handle.controller is not None:
            record_split_state(record, handle.controller)
    record["weights"] = {n: whole(p.detach()).tolist() for n, p in model.named_parameters()}
    return record


def _launch(tmp_path, world: int, ep: int, broken: str | None = None) -> list[dict]:
    return launch("tests.train.test_expert_parallel", [str(ep)], tmp_path / f"ep-{world}-{ep}.json", world, broken)


@pytest.fixture(scope="module")
def one_process() -> dict:
    torch.set_num_threads(1)
    return {v: run(1, 0, 1, v) for v in VARIANTS}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "ep2xefsdp2"])
def test_expert_parallel_matches_one_process(tmp_path, one_process, world, ep):
    ranks = _launch(tmp_path, world, ep)
    for variant in VARIANTS:
        gaps = compare(one_process[variant], [r[variant] for r in ranks])
        assert all(gap < TOL[key] for key, gap in gaps.items()), (variant, gaps)
        assert len(ranks[0][variant]["split_grads"]) == STEPS
    # every variant trains differently: none is a no-op
    assert len({tuple(ranks[0][v]["losses"]) for v in VARIANTS}) == len(VARIANTS)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_local_only_reducer_is_caught(tmp_path, one_process):
    """The bug this file exists for: each rank's sums over its own experts only. The ranks then split in
    bases of their own experts and their shared parts drift apart, and the comparison above sees it."""
    ranks = _launch(tmp_path, 2, 2, broken="default")
    gaps = compare(one_process["default"], [r["default"] for r in ranks])
    assert gaps["q"] > 1e-2 and gaps["shared"] > 1e-3, gaps
    assert gap(ranks[0]["default"]["shared"], ranks[1]["default"]["shared"]) > 1e-3  # the ranks disagree


if __name__ == "__main__":
    worker(sys.argv[2], lambda world, rank, variant: run(world, rank, int(sys.argv[1]), variant))
