"""The run's parallelism: chosen once from loop.parallel and the launch, and driven by the loop through one
interface (the DDP and FSDP2 implementations on 2 processes: tests/train/test_distributed.py)."""

import json
import re

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.train import parallel
from sdmoe.train.loop import train
from sdmoe.train.parallel import DDP, FSDP2, Single, choose

TORCHRUN_2 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def test_one_process_is_single_on_the_loop_device(tiny_config):
    tiny_config.loop.device = "cpu"
    par = choose(tiny_config)
    assert type(par) is Single and par.device == torch.device("cpu") and par.is_main and par.world_size == 1
    ids_BS = torch.arange(8).reshape(4, 2)
    assert par.batch(ids_BS) is ids_BS and par.mean(2.5) == 2.5 and par.agree([torch.ones(2)])


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_joining(tiny_config, monkeypatch):
    import torch.distributed as dist

    for k, v in TORCHRUN_2.items():
        monkeypatch.setenv(k, v)
    tiny_config.loop.device, tiny_config.data.batch_size = "cpu", 3
    with pytest.raises(UserError, match=r"^data.batch_size=3 does not split over 2 processes; use a multiple of 2$"):
        choose(tiny_config)
    assert not dist.is_initialized()


def test_each_rank_takes_its_rows_of_the_global_batch():
    ids_BS = torch.arange(12).reshape(6, 2)
    rows = [DDP(torch.device("cpu"), rank, 3).batch(ids_BS) for rank in range(3)]
    assert torch.equal(torch.cat(rows), ids_BS) and all(r.shape == (2, 2) for r in rows)
    assert not DDP(torch.device("cpu"), 1, 3).is_main
    assert FSDP2(torch.device("cpu"), 0, 2).checkpoint_format == "fsdp" != DDP(torch.device("cpu"), 0, 2).checkpoint_format


class Recording(Single):
    """One process, recording which of the interface's methods the loop calls, in order."""

    calls: list

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if callable(attr) and not name.startswith("_") and name in parallel.Parallelism.__dict__:
            object.__getattribute__(self, "calls").append(name)
        return attr


def _recording(monkeypatch, checkpoint_format="ddp") -> list:
    calls = []

    def choose_recording(cfg):
        par = Recording(torch.device("cpu"))
        par.calls, par.checkpoint_format = calls, checkpoint_format
        return par

    monkeypatch.setattr(parallel, "choose", choose_recording)
    return calls


def _without_steps(calls):
    """The calls other than those every step and log make."""
    return [c for c in calls if c not in ("batch", "mean", "sum_", "state_dicts")]


def test_the_loop_drives_a_run_through_the_interface(tmp_path, tiny_config, tiny_dataset, monkeypatch):
    """A new run, then its resume: the model built, loaded (weights before, optimizer state after it is
    parallelized, as FSDP2 needs), a checkpoint's state taken at every save, the final model, the end."""
    tiny_config.method = "sd-moe"
    tiny_config.loop.steps, tiny_config.loop.checkpoint_every, tiny_config.loop.eval_every = 8, 4, 8
    tiny_config.sdmoe.split_step = 2
    calls = _recording(monkeypatch)
    train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset, stop_after=4)
    # the split at step 2 makes the bases every rank's and checks that they agree
    assert _without_steps(calls) == ["barrier", "build", "parallelize", "broadcast_", "agree", "barrier", "close"]
    assert calls.count("batch") == 4 and calls.count("state_dicts") == 1
    calls.clear()
    train(tiny_config, tmp_path / "run", resume=True, progress=False, dataset=tiny_dataset)
    assert _without_steps(calls) == ["barrier", "build", "load_model_state", "parallelize", "load_optimizer_state",
                                     "final_model", "barrier", "close"]
    assert calls.count("batch") == 4 and calls.count("state_dicts") == 1


@pytest.mark.parametrize("written, resumed, fix", [
    ("fsdp", "ddp", "resume it with --set loop.parallel=fsdp under torchrun"),
    ("ddp", "fsdp", "resume it without loop.parallel=fsdp (it was a DDP or one-process run)"),
])
def test_a_checkpoint_resumes_only_in_its_own_format(written, resumed, fix, tmp_path, tiny_config, tiny_dataset,
                                                      monkeypatch):
    """FSDP2 keeps the optimizer state by parameter name, one process and DDP by tensor: never crossed."""
    tiny_config.loop.steps, tiny_config.loop.checkpoint_every = 4, 2
    out = tmp_path / "run"
    train(tiny_config, out, progress=False, dataset=tiny_dataset, stop_after=2)
    state_json = out / "checkpoints" / "step_0000002" / "state.json"
    state = json.loads(state_json.read_text())
    assert state["parallel"] == "ddp"
    state_json.write_text(json.dumps({**state, "parallel": written}))
    before = (out / "metrics.jsonl").read_bytes()
    _recording(monkeypatch, checkpoint_format=resumed)
    with pytest.raises(UserError, match=re.escape(f"written with loop.parallel={written}; {fix}") + "$"):
        train(tiny_config, out, resume=True, progress=False, dataset=tiny_dataset)
    assert (out / "metrics.jsonl").read_bytes() == before
