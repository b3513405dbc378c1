"""The newest doors tried as a careless user would: `upcycle`, `train --init`, the upcycle and finetune compares,
and the torchrun environment. Every case goes through `sdmoe.cli.main`: exit 2, ONE `sdmoe: error:` line
naming the problem, and the file system exactly as it was (every file's bytes and every directory, so no
folder made on the way and no temp folder is left). docs/reliability.md lists the classes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from sdmoe.cli import main
from tests.reliability.test_bad_input import error_line

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--preset", "tiny", "--quiet", "--steps", "2", "--set", "loop.threads=1",
         "--set", "loop.monitor_every=0"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16)


def state(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None) under `root`."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dataset):
    """A tiny dense qwen3 and a tiny qwen3_moe, each with the tiny tokenizer (512 tokens)."""
    root = tmp_path_factory.mktemp("models")
    vocab = len(tiny_dataset.tokenizer)
    torch.manual_seed(0)
    for name, model_type, extra in (("dense", "qwen3", dict(intermediate_size=48)),
                                    ("moe", "qwen3_moe", dict(moe_intermediate_size=16, num_experts=4,
                                                              num_experts_per_tok=2))):
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **SMALL, **extra)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tiny_dataset.tokenizer.save_pretrained(root / name)
    return SimpleNamespace(dense=root / "dense", moe=root / "moe")


@pytest.fixture()
def world(tmp_path, models, monkeypatch):
    """A fresh copy of both checkpoints under tmp_path/world, the working directory: cases break their copy."""
    root = tmp_path / "world"
    shutil.copytree(models.dense, root / "dense")
    shutil.copytree(models.moe, root / "moe")
    monkeypatch.chdir(root)
    return root


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in fields.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


_DROP = object()


def _nan_in_a_tensor(path: Path) -> None:
    weights = load_file(path / "model.safetensors")
    key = sorted(k for k in weights if "experts" in k or "mlp" in k)[0]
    weights[key][0] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _index_points_elsewhere(path: Path) -> None:
    """Two shards and an index that names the wrong one for one tensor."""
    weights = load_file(path / "model.safetensors")
    keys = sorted(weights)
    (path / "model.safetensors").unlink()
    save_file({k: weights[k] for k in keys[:5]}, path / "a.safetensors")
    save_file({k: weights[k] for k in keys[5:]}, path / "b.safetensors")
    weight_map = {k: "a.safetensors" if i < 5 else "b.safetensors" for i, k in enumerate(keys)}
    weight_map[keys[0]] = "b.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _more_tokens(path: Path) -> None:
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    n = len(vocab)
    vocab.update({f"extra{i}": n + i for i in range(40)})
    (path / "tokenizer.json").write_text(json.dumps(tok))


def _empty_vocabulary(path: Path) -> None:
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["model"]["vocab"], tok["model"]["merges"], tok["added_tokens"] = {}, [], []
    (path / "tokenizer.json").write_text(json.dumps(tok))


UP = ["upcycle", "dense", "--experts", "4", "--top-k", "2", "--quiet", "--out"]
INIT = [*TRAIN, "--init", "moe", "--out"]
UPCMP = ["compare", "--preset", "upcycle-tiny", "--quiet", "--init", "dense", "--out"]
FTCMP = ["compare", "--preset", "finetune-tiny", "--quiet", "--out"]

# (id, class, break the world (or None), argv, fragments of the one error line)
CASES = [
    # -- config.json values missing, null, inconsistent with each other or with the weights
    ("upcycle_missing_field", "traceback", lambda w: _edit_config(w / "dense", hidden_size=_DROP), [*UP, "a/b/out"],
     ["config.json gives [512, 4096]", "config.json has no hidden_size"]),
    ("upcycle_null_field", "traceback", lambda w: _edit_config(w / "dense", num_hidden_layers=None), [*UP, "out"],
     ["config.json is inconsistent", "'num_hidden_layers' expected int, got NoneType"]),
    ("upcycle_layer_list_mismatch", "traceback",
     lambda w: _edit_config(w / "dense", layer_types=["full_attention"] * 3), [*UP, "out"],
     ["`num_hidden_layers` (2) must be equal to the number of `layer_types` (3)"]),
    ("upcycle_index_wrong_shard", "traceback", lambda w: _index_points_elsewhere(w / "dense"), [*UP, "out"],
     ["model.safetensors.index.json in dense puts", "in b.safetensors, which does not hold it"]),
    ("init_null_field", "traceback", lambda w: _edit_config(w / "moe", num_attention_heads=None), [*INIT, "run"],
     ["'num_attention_heads' expected int, got NoneType"]),
    ("compare_init_null_field", "traceback", lambda w: _edit_config(w / "moe", num_attention_heads=None),
     ["compare", "--preset", "tiny", "--quiet", "--init", "moe", "--out", "cmp"],
     ["config.json is inconsistent", "'num_attention_heads' expected int"]),
    ("init_missing_field", "traceback", lambda w: _edit_config(w / "moe", hidden_size=_DROP), [*INIT, "run"],
     ["config.json has no hidden_size"]),
    ("init_top_k_above_experts", "traceback", lambda w: _edit_config(w / "moe", num_experts_per_tok=9),
     [*INIT, "run"], ["has num_experts_per_tok=9 but each MoE layer has 4 experts"]),
    ("init_tokenizer_past_the_embedding", "traceback", lambda w: _more_tokens(w / "moe"), [*INIT, "run"],
     ["has 552 tokens but the model's embedding has 512 rows"]),
    ("upcycle_tokenizer_past_the_embedding", "traceback", lambda w: _more_tokens(w / "dense"), [*UP, "out"],
     ["has 552 tokens but the model's embedding has 512 rows"]),
    # -- numeric options not finite, or outside what a generator takes
    ("upcycle_noise_inf", "silently wrong", None, [*UP, "out", "--method", "noise", "--noise", "inf"],
     ["--noise=inf is not a finite number"]),
    ("upcycle_drop_ratio_nan", "traceback", None, [*UP, "out", "--method", "drop", "--drop-ratio", "nan"],
     ["--drop-ratio=nan is not a finite number"]),
    ("upcycle_seed_negative", "traceback", None, [*UP, "out", "--seed", "-1"], ["--seed=-1 is out of range"]),
    ("upcycle_seed_beyond_64_bits", "traceback", None, [*UP, "out", "--seed", str(2**70)],
     ["is out of range; use an integer in [0, 4294967295]"]),
    # -- config.json names fewer layers than the weights hold: refused, not dropped
    ("upcycle_fewer_layers", "silently wrong",
     lambda w: _edit_config(w / "dense", num_hidden_layers=1, layer_types=["full_attention"]), [*UP, "out"],
     ["hold decoder layers up to 1", "num_hidden_layers=1", "set num_hidden_layers=2"]),
    ("init_fewer_layers", "silently wrong", lambda w: _edit_config(w / "moe", num_hidden_layers=1), [*INIT, "run"],
     ["hold decoder layers up to 1", "would drop layers 1..1"]),
    # -- a run that promises several processes, in one
    ("fsdp_outside_torchrun", "silently wrong", None, [*TRAIN, "--set", "loop.parallel=fsdp", "--out", "run"],
     ["loop.parallel=fsdp needs several processes", "torchrun"]),
    ("ddp_outside_torchrun", "silently wrong", None, [*TRAIN, "--set", "loop.parallel=ddp", "--out", "run"],
     ["loop.parallel=ddp needs several processes"]),
    ("meta_init_outside_torchrun", "silently wrong", None,
     [*TRAIN, "--set", "loop.parallel=fsdp", "--set", "loop.meta_init=true", "--out", "run"],
     ["loop.parallel=fsdp needs several processes"]),
    # -- found before anything is written (not after the run folder, or five checkpoints, exist)
    ("init_nan_in_the_weights", "written first", lambda w: _nan_in_a_tensor(w / "moe"), [*INIT, "a/run"],
     ["holds NaN or infinite values", "start from an earlier checkpoint"]),
    ("init_empty_vocabulary", "written first", lambda w: _empty_vocabulary(w / "moe"), [*INIT, "run"],
     ["the tokenizer in", "has an empty vocabulary"]),
    ("upcycle_compare_tokenizer", "written first", lambda w: _more_tokens(w / "dense"), [*UPCMP, "cmp"],
     ["world/dense has 552 tokens"]),  # the user's path, not a checkpoint of the compare's own
    ("upcycle_compare_bad_set", "written first", None, [*UPCMP, "cmp", "--set", "sdmoe.rank=999"],
     ["sdmoe.rank=999"]),
    ("upcycle_compare_model_set", "written first", None, [*UPCMP, "cmp", "--set", "model.hidden_size=64"],
     ["--set model.hidden_size with --init"]),
    ("finetune_compare_bad_set", "written first", None, [*FTCMP, "a/cmp", "--set", "optim.lr=-1"],
     ["optim.lr=-1.0 is out of range"]),
    ("finetune_compare_parallel", "written first", None, [*FTCMP, "cmp", "--set", "loop.parallel=fsdp"],
     ["loop.parallel=fsdp needs several processes"]),
    # -- the working directory as --out (it used to be emptied before the rename failed)
    ("upcycle_out_is_the_working_directory", "dangerous", lambda w: shutil.rmtree(w / "moe"), [*UP, "."],
     ["is a directory that is not empty"]),
    ("upcycle_out_holds_the_working_directory", "dangerous", None, [*UP, ".."],
     ["is a directory that is not empty"]),
    # -- upcycle's routers from prompts and BTX experts: every new input checked before the first write
    ("upcycle_router_without_prompts", "new input", None, [*UP, "out", "--router", "hidden"],
     ["--router hidden initialises each expert's router from prompts", "add --prompts"]),
    ("upcycle_prompts_missing", "new input", lambda w: _prompt_files(w, 3),
     [*UP, "a/out", "--router", "hidden", "--prompts", "p0.txt", "p1.txt", "p2.txt", "nowhere.txt"],
     ["--prompts nowhere.txt does not exist"]),
    ("upcycle_prompts_not_utf8", "new input", lambda w: _prompt_files(w, 4, latin1=2),
     [*UP, "out", "--router", "embed", "--prompts", "p0.txt", "p1.txt", "p2.txt", "p3.txt"],
     ["--prompts p2.txt is not UTF-8"]),
    ("upcycle_prompts_count", "new input", lambda w: _prompt_files(w, 2),
     [*UP, "out", "--router", "hidden", "--prompts", "p0.txt", "p1.txt"],
     ["--prompts describes 2 experts but the MoE has 4"]),
    ("upcycle_prompts_empty", "new input", lambda w: _prompt_files(w, 4, empty=3),
     [*UP, "out", "--router", "hidden", "--prompts", "p0.txt", "p1.txt", "p2.txt", "p3.txt"],
     ["holds no prompt for expert 3"]),
    ("upcycle_prompts_a_directory", "new input", lambda w: (w / "pdir").mkdir(),
     [*UP, "out", "--router", "hidden", "--prompts", "pdir"], ["pdir is a directory, not a regular file"]),
    ("upcycle_experts_from_other_family", "new input", lambda w: _fine_tune_copy(w, model_type="llama"),
     [*UP, "out", "--experts-from", "dense", "ft"], ["--experts-from ft is a 'llama' model but"]),
    ("upcycle_experts_from_other_vocabulary", "new input", lambda w: _more_tokens(_fine_tune_copy(w)),
     [*UP, "out", "--experts-from", "dense", "ft"], ["--experts-from ft's vocabulary (tokenizer.json) differs"]),
    ("upcycle_experts_from_nan", "new input", lambda w: _nan_in_a_tensor(_fine_tune_copy(w)),
     [*UP, "out", "--experts-from", "dense", "ft"], ["holds NaN or infinite values"]),
    ("upcycle_experts_from_missing", "new input", None, [*UP, "out", "--experts-from", "dense", "nowhere"],
     ["--experts-from nowhere is not a directory"]),
    ("upcycle_nan_in_the_weights", "written first", lambda w: _nan_in_a_tensor(w / "dense"), [*UP, "a/out"],
     ["holds NaN or infinite values", "upcycle an earlier checkpoint"]),
]


def _prompt_files(world: Path, n: int, latin1: int | None = None, empty: int | None = None) -> None:
    for i in range(n):
        text = "" if i == empty else f"prompts of expert {i}\nthe {i}th kind of text\n"
        (world / f"p{i}.txt").write_bytes(text.encode("latin-1" if i == latin1 else "utf-8") + (
            "caf\xe9".encode("latin-1") if i == latin1 else b""))


def _fine_tune_copy(world: Path, **config) -> Path:
    shutil.copytree(world / "dense", world / "ft")
    if config:
        _edit_config(world / "ft", **config)
    return world / "ft"


@pytest.mark.parametrize("case, kind, breaks, argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_each_class_is_one_line_exit_2_and_the_disk_as_it_was(case, kind, breaks, argv, fragments, world, capsys):
    if breaks:
        breaks(world)
    before = state(world.parent)
    assert main(argv) == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert state(world.parent) == before


def test_the_working_directory_itself_is_refused_even_when_empty(tmp_path, models, monkeypatch, capsys):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["upcycle", str(models.dense), "--experts", "4", "--top-k", "2", "--quiet", "--out", "."]) == 2
    assert "is the working directory, which the output would replace" in error_line(capsys)
    assert here.is_dir() and list(here.iterdir()) == []


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "2"}, "a partial torchrun environment: WORLD_SIZE set but RANK, LOCAL_RANK, MASTER_ADDR"),
    ({"RANK": "1"}, "a partial torchrun environment: RANK set"),
    ({"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "the torchrun environment is inconsistent (RANK=3"),
    ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "holds a value that is not an integer"),
])
def test_a_partial_torchrun_environment_is_named(env, fragment, world, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = state(world.parent)
    assert main([*TRAIN, "--out", "run"]) == 2
    assert fragment in error_line(capsys)
    assert state(world.parent) == before


def test_one_layer_of_experts_larger_than_memory_is_refused_with_the_figure(world, monkeypatch, capsys):
    import sdmoe.models.upcycle as up

    monkeypatch.setattr(up, "available_memory", lambda: 10_000)
    before = state(world.parent)
    assert main([*UP, "out"]) == 2
    line = error_line(capsys)
    assert "one layer of 4 experts takes about" in line and "9.8 KiB is available" in line, line
    assert state(world.parent) == before


def test_an_output_larger_than_the_disk_is_refused_with_the_figure(world, monkeypatch, capsys):
    import sdmoe.files as files

    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 2048))
    before = state(world.parent)
    assert main(["upcycle", "dense", "--experts", "1000", "--top-k", "2", "--quiet", "--out", "out"]) == 2
    line = error_line(capsys)
    # the dense tensors, each layer's FFN (gate, up: 48 x 32, down: 32 x 48, float32) 999 times more, the routers
    dense = sum(t.numel() * 4 for t in load_file(world / "dense" / "model.safetensors").values())
    need = dense + 2 * 999 * 3 * 48 * 32 * 4 + 2 * 1000 * 32 * 4
    assert f"the output needs about {files.size_text(need)} but" in line and "has 2.0 KiB free" in line, line
    assert state(world.parent) == before


def test_a_disk_that_fills_during_upcycle_leaves_nothing(world, monkeypatch, capsys):
    import sdmoe.models.upcycle as up

    real, calls = up.save_file, []

    def full_on_the_second_shard(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path, *a, **k)

    monkeypatch.setattr(up, "save_file", full_on_the_second_shard)
    before = state(world.parent)
    assert main([*UP, "new/parent/out"]) == 2
    line = error_line(capsys)
    assert "could not write the upcycled model" in line and "(No space left on device)" in line, line
    assert len(calls) == 2 and state(world.parent) == before  # no temp folder, no new/ or new/parent/


def test_a_read_only_disk_is_one_line_before_anything(world, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        assert main([*UP, str(ro / "out")]) == 2
        assert "(Read-only file system); choose a writable --out" in error_line(capsys)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_stale_temp_folder_of_a_killed_run_is_removed_a_live_one_kept(world, capsys):
    from sdmoe.files import DirLock

    stale, live = world / ".tmp-out-abcd1234", world / ".tmp-out-live5678"
    for d in (stale, live):
        d.mkdir()
        (d / "model-00001-of-00004.safetensors").write_bytes(b"half")
    with DirLock(live):  # another job still writing the same target
        assert main([*UP, "out"]) == 0
    assert not stale.exists() and live.is_dir() and (world / "out" / "config.json").is_file()


# -- killed in the middle of writing ------------------------------------------------------------

SLOW_UPCYCLE = """
import sys, time
import sdmoe.models.upcycle as up
real = up.save_file
def slow(*a, **k):  # each shard written, then a pause: the test's signal lands mid-write
    real(*a, **k)
    time.sleep(0.4)
up.save_file = slow
from sdmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _first_shard_written(world: Path) -> bool:
    try:
        return bool(list(world.glob(".tmp-out-*/model-00001-*")))
    except FileNotFoundError:  # a folder the glob listed went away under it (the output check's own probe)
        return False


def _upcycle_until_a_shard_is_written(world: Path, sig: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_UPCYCLE, *UP, "out"], cwd=world, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not _first_shard_written(world):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.communicate()
    return proc.returncode


def test_sigterm_during_upcycle_leaves_nothing(world):
    before = state(world.parent)
    assert _upcycle_until_a_shard_is_written(world, signal.SIGTERM) == 128 + signal.SIGTERM
    assert state(world.parent) == before


@pytest.mark.slow  # a subprocess killed mid-write; SIGTERM's case above stays in the default tier
def test_sigkill_during_upcycle_leaves_a_temp_folder_the_next_run_removes(world, capsys):
    assert _upcycle_until_a_shard_is_written(world, signal.SIGKILL) == -signal.SIGKILL
    assert list(world.glob(".tmp-out-*")) and not (world / "out").exists()  # SIGKILL cannot be caught
    assert main([*UP, "out"]) == 0
    assert not list(world.glob(".tmp-out-*")) and (world / "out" / "model.safetensors.index.json").is_file()
