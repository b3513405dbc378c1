"""Bad input through `sdmoe.cli.main`: exit code 2, ONE `sdmoe: error:` line naming the
problem, and no pre-existing file changed (every byte under tmp_path compared)."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdmoe.cli import main

TRAIN = ["train", "--preset", "tiny", "--quiet"]


def error_line(capsys) -> str:
    """The single `sdmoe: error:` line on stderr (progress bars of transformers aside)."""
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and "it/s]" not in ln and "%|" not in ln]
    assert len(lines) == 1, lines
    assert lines[0].startswith("sdmoe: error: "), lines
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dataset):
    """A finished tiny run (its model/ is a good checkpoint), broken copies of it, and bad corpora."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sdmoe.train.config import preset
    from sdmoe.train.loop import train

    root = tmp_path_factory.mktemp("world")
    cfg = preset("tiny")
    cfg.loop.steps, cfg.loop.monitor_every = 2, 0
    train(cfg, root / "run", progress=False, dataset=tiny_dataset)
    good = root / "run" / "model"
    weights = (good / "model.safetensors").read_bytes()

    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(good, no_tokenizer)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / f).unlink()
    dense = root / "dense_llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(dense)
    AutoTokenizer.from_pretrained(good, trust_remote_code=False).save_pretrained(dense)

    text = root / "text"
    text.mkdir()
    (text / "empty.txt").write_text("  \n")
    (text / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (text / "latin1.txt").write_bytes(("café naïve résumé " * 200).encode("latin-1"))
    (text / "empty_dir").mkdir()
    (text / "a_file").write_text("not a directory")
    (text / "bad.json").write_text("{model: ")
    return SimpleNamespace(root=root, run=root / "run", good=good, truncated=truncated,
                           no_tokenizer=no_tokenizer, dense=dense, text=text)


def _analyze(path):
    return ["analyze", str(path), "--rank", "4", "--batches", "1", "--seq-len", "16", "--batch-size", "2"]


# (id, argv(world, out), fragment of the error line)
CASES = [
    # -- configs
    ("rank_negative", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "sdmoe.rank=-1", "--out", o], "sdmoe.rank=-1 is out of range"),
    ("rank_eq_d", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "sdmoe.rank=32", "--out", o], "sdmoe.rank=32 is out of range"),
    ("rank_gt_d", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "sdmoe.rank=99", "--out", o], "rank must be in 1..d-1"),
    ("rank_list_length", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "sdmoe.rank=[4,4,4]", "--out", o], "lists 3 ranks"),
    ("topk_gt_experts", lambda w, o: [*TRAIN, "--set", "model.top_k=5", "--out", o], "exceeds model.num_experts"),
    ("heads_not_dividing", lambda w, o: [*TRAIN, "--set", "model.num_heads=3", "--out", o], "not divisible by model.num_heads"),
    ("unknown_style", lambda w, o: [*TRAIN, "--style", "gpt9", "--out", o], "unknown model style 'gpt9'"),
    ("unknown_basis_source", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "sdmoe.basis_source=magic", "--out", o], "unknown basis_source 'magic'"),
    ("unknown_key", lambda w, o: [*TRAIN, "--set", "model.foo=1", "--out", o], "unknown config key 'model.foo'"),
    ("wrong_type_number", lambda w, o: [*TRAIN, "--set", "optim.lr=fast", "--out", o], "optim.lr takes a number"),
    ("wrong_type_int", lambda w, o: [*TRAIN, "--set", "model.hidden_size=3.5", "--out", o], "model.hidden_size takes an integer"),
    ("set_without_equals", lambda w, o: [*TRAIN, "--set", "optim.lr", "--out", o], "--set takes key=value"),
    ("config_not_json", lambda w, o: [*TRAIN, "--config", str(w.text / "bad.json"), "--out", o], "is not valid JSON"),
    ("parallel_unknown", lambda w, o: [*TRAIN, "--set", "loop.parallel=zero3", "--out", o], "loop.parallel must be one of auto, ddp, fsdp"),
    ("fsdp_split_later", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "loop.parallel=fsdp", "--out", o], "set sdmoe.split_step=0"),
    ("fsdp_reestimate", lambda w, o: [*TRAIN, "--method", "sd-moe", "--set", "loop.parallel=fsdp", "--set", "sdmoe.split_step=0", "--set", "sdmoe.reestimate_every=5", "--out", o], "set sdmoe.reestimate_every=0"),
    ("meta_init_without_fsdp", lambda w, o: [*TRAIN, "--set", "loop.meta_init=true", "--out", o], "set loop.parallel=fsdp"),
    ("split_after_end", lambda w, o: [*TRAIN, "--method", "sd-moe", "--steps", "3", "--out", o], "sdmoe.split_step=5 is not before loop.steps=3"),
    # -- corpora
    ("corpus_empty_file", lambda w, o: [*TRAIN, "--text", str(w.text / "empty.txt"), "--out", o], "is empty or whitespace only"),
    ("corpus_binary", lambda w, o: [*TRAIN, "--text", str(w.text / "binary.bin"), "--out", o], "looks binary"),
    ("corpus_latin1", lambda w, o: [*TRAIN, "--text", str(w.text / "latin1.txt"), "--out", o], "is not valid UTF-8"),
    ("corpus_empty_dir", lambda w, o: [*TRAIN, "--text", str(w.text / "empty_dir"), "--out", o], "holds no files"),
    ("corpus_missing", lambda w, o: [*TRAIN, "--text", str(w.text / "nope.txt"), "--out", o], "does not exist"),
    # -- checkpoints for analyze / generate
    ("analyze_truncated", lambda w, o: [*_analyze(w.truncated), "--out", o], "is truncated or corrupt"),
    ("analyze_dense_llama", lambda w, o: [*_analyze(w.dense), "--out", o], "no MoE layers found"),
    ("analyze_not_a_directory", lambda w, o: [*_analyze(w.text / "a_file"), "--out", o], "is not a directory"),
    ("analyze_missing", lambda w, o: [*_analyze(w.root / "nope"), "--out", o], "does not exist"),
    ("analyze_run_dir_not_model", lambda w, o: [*_analyze(w.run), "--out", o], "has no config.json"),
    ("analyze_rank_too_big", lambda w, o: ["analyze", str(w.good), "--rank", "32", "--out", o], "rank=32 does not fit hidden size D=32"),
    ("analyze_out_is_a_file", lambda w, o: [*_analyze(w.good), "--out", str(w.text / "a_file")], "is a file, not a directory"),
    ("generate_truncated", lambda w, o: ["generate", str(w.truncated)], "is truncated or corrupt"),
    ("generate_no_tokenizer", lambda w, o: ["generate", str(w.no_tokenizer)], "holds no tokenizer"),
    ("generate_not_a_directory", lambda w, o: ["generate", str(w.text / "a_file")], "is not a directory"),
    ("generate_run_dir_not_model", lambda w, o: ["generate", str(w.run)], "the trained model is in its model/ subdirectory"),
    ("generate_bad_temperature", lambda w, o: ["generate", str(w.good), "--temperature", "-1"], "--temperature must be >= 0"),
    # -- CLI misuse
    ("no_command", lambda w, o: [], "no command given"),
    ("unknown_command", lambda w, o: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("bad_flag_value", lambda w, o: [*TRAIN, "--steps", "many", "--out", o], "invalid int value: 'many'"),
    ("unknown_flag", lambda w, o: [*TRAIN, "--turbo", "--out", o], "unrecognized arguments: --turbo"),
    ("resume_fresh_dir", lambda w, o: [*TRAIN, "--resume", "--out", o], "nothing to resume"),
    ("second_run_into_used_out", lambda w, o: [*TRAIN, "--steps", "2", "--set", "loop.monitor_every=0", "--out", str(w.run)], "holds a previous run; pass --resume"),
    ("resume_with_other_config", lambda w, o: [*TRAIN, "--resume", "--set", "model.hidden_size=64", "--out", str(w.run)], "different model config"),
    ("resume_with_other_method", lambda w, o: [*TRAIN, "--resume", "--method", "sd-moe", "--out", str(w.run)], "method 'sd-moe'"),
    ("out_not_empty_not_a_run", lambda w, o: [*TRAIN, "--out", str(w.text)], "not empty and holds no sdmoe run"),
    ("out_under_a_file", lambda w, o: [*TRAIN, "--out", str(w.text / "a_file" / "run")], "cannot write to"),
    ("analyze_no_tokenizer", lambda w, o: [*_analyze(w.no_tokenizer), "--out", o], "tokenizer"),
]


@pytest.mark.parametrize("case, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(case, argv, fragment, world, tmp_path, capsys):
    out = tmp_path / "out"
    before = snapshot(world.root)
    assert main(argv(world, str(out))) == 2
    line = error_line(capsys)
    assert fragment in line, line
    assert snapshot(world.root) == before  # nothing pre-existing was touched
    assert not (out / "run.json").exists() and not (out / "checkpoints").exists() and not (out / "analysis.json").exists()


def test_sdmoe_rank_0_means_d_over_4(tmp_path, capsys):
    """rank=0 is not an error: it is the documented default d // 4."""
    from sdmoe.train.config import preset, set_value, validate

    cfg = preset("tiny")
    cfg.method = "sd-moe"
    set_value(cfg, "sdmoe.rank", "0")
    validate(cfg)
    assert cfg.sdmoe.resolve_ranks(cfg.model.hidden_size, cfg.model.num_layers) == [8, 8]


def test_dense_model_still_generates(world, capsys):
    """generate takes any causal LM, MoE or not."""
    assert main(["generate", str(world.dense), "--max-new-tokens", "3", "--prompt", "The"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_one_enormous_line_without_whitespace_trains(tmp_path, capsys):
    """Decision: a corpus that is one 300 kB line with no whitespace WORKS, in seconds.

    (Byte-level BPE training is quadratic in a pre-token's length; the trainer sees
    such runs in 1000-character pieces, see `sdmoe.data.tokenizer.cap_words`.)"""
    rng = random.Random(0)
    blob = tmp_path / "blob.txt"
    blob.write_text("".join(rng.choice("abcdefgh0123.,") for _ in range(300_000)))
    t0 = time.perf_counter()
    code = main([*TRAIN, "--steps", "2", "--set", "loop.monitor_every=0", "--text", str(blob), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-300:]
    assert "(blob " in captured.out  # the one domain, named after the file, was trained and evaluated
    assert (tmp_path / "o" / "model" / "model.safetensors").is_file()
    assert time.perf_counter() - t0 < 60  # was > 2 minutes before the cap


def test_cap_words_round_trips():
    from sdmoe.data.tokenizer import MAX_TRAIN_WORD, cap_words

    for text in ["plain words here", "x" * 2500, "ab " + "y" * (MAX_TRAIN_WORD + 1) + " cd\n", "z" * MAX_TRAIN_WORD]:
        pieces = list(cap_words(text))
        assert "".join(pieces) == text
        assert max(len(p.strip()) for p in pieces) <= max(MAX_TRAIN_WORD, 3)
    assert list(cap_words("ordinary text")) == ["ordinary text"]  # untouched: same tokenizer as before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert main([*TRAIN, "--out", str(locked / "run")]) == 2
    assert "cannot write to" in error_line(capsys)
