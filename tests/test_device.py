"""`--device` and `loop.precision`: names checked without torch, a missing GPU in one line, the defaults."""

from __future__ import annotations

import pytest
import torch

from sdmoe.cli import main
from sdmoe.device import check_device_name, experts_kernel, resolve_device, uses_bf16
from sdmoe.errors import UserError
from sdmoe.train.config import from_dict, preset, validate
from sdmoe.train.loop import train

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "", "cpu:0", "mps"])
def test_unknown_device_names_are_one_line(name):
    with pytest.raises(UserError) as e:
        check_device_name(name)
    assert "unknown device" in str(e.value) and "auto" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_loop_device_fails_validation():
    cfg = preset("tiny")
    cfg.loop.device = "gpu"
    with pytest.raises(UserError, match="loop.device: unknown device 'gpu'"):
        validate(cfg)


@no_cuda
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_names_the_fix(name):
    with pytest.raises(UserError) as e:
        resolve_device(name)
    assert "sees no CUDA GPU" in str(e.value) and "--device cpu" in str(e.value)


def test_precision_and_kernel_follow_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_bf16("auto", cpu) and uses_bf16("auto", cuda)
    assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", cuda)
    assert experts_kernel("auto", cpu) == "eager" and experts_kernel("auto", cuda) == "grouped_mm"
    assert experts_kernel("batched_mm", cuda) == "batched_mm"


@pytest.mark.parametrize("saved, precision", [(True, "bf16"), (False, "fp32")])
def test_a_run_saved_with_loop_bf16_still_loads(saved, precision):
    raw = preset("tiny").to_dict()
    del raw["loop"]["precision"]
    raw["loop"]["bf16"] = saved  # how sdmoe 0.1 wrote the precision
    assert from_dict(raw).loop.precision == precision


@no_cuda
def test_train_on_a_missing_gpu_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--device", "cuda", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdmoe: error: device cuda asked for") and "\n" not in err
    assert not out.exists()


@no_cuda
@pytest.mark.parametrize("command", [["compare", "--preset", "tiny"], ["analyze", "MISSING"]])
def test_other_commands_refuse_a_missing_gpu_first(tmp_path, capsys, command):
    assert main([*command, "--device", "cuda:0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sees no CUDA GPU" in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_resume_may_move_the_run_to_another_device(tmp_path, tiny_config, tiny_dataset):
    """loop.device and loop.precision change where and how the numbers are rounded, not the run: a
    resume may change them (a run written on a GPU continues on a CPU)."""
    tiny_config.loop.steps = 12
    train(tiny_config, tmp_path / "run", progress=False, stop_after=10, dataset=tiny_dataset)
    tiny_config.loop.device, tiny_config.loop.precision = "cpu", "fp32"
    result = train(tiny_config, tmp_path / "run", resume=True, progress=False, dataset=tiny_dataset)
    assert result.steps == 12
