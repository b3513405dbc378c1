"""`sdmoe upcycle --router hidden|hidden_avg|embed --prompts ...`: routers from prompts that describe each expert,
computed here independently (one prompt at a time, no padding) the way mergekit-moe's get_gate_params does."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sdmoe.cli import main
from sdmoe.models.upcycle import upcycle
from sdmoe.moe import find_moe_blocks
from tests.models.test_upcycle import _dense, _error, _ids

PROMPTS = [
    ["the quick brown fox", "jumps over the lazy dog", "a fox", "brown foxes run", "quick", "the fox and the dog",
     "over and over", "lazy lazy dog", "the end of the fox"],  # nine: two batches of 8, different lengths
    ["a small model learns small things", "small things"],
    ["the dog; the dog; the dog"],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("tok")
    tiny_dataset.tokenizer.save_pretrained(out)
    return out


def _write_prompts(tmp_path, prompts=PROMPTS):
    files = []
    for i, lines in enumerate(prompts):
        files.append(tmp_path / f"expert{i}.txt")
        files[-1].write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # blank lines are skipped
    return files


def _expected(dense, tok, prompts, negative=(), mode="hidden"):
    """One expert's rows (layers, D), prompt by prompt: the input of each layer at the last token (or averaged
    over the tokens), averaged over the prompts, minus the negatives', unit length."""
    def mean(texts):
        rows = []
        for t in texts:
            ids = tok((tok.bos_token or "") + t, add_special_tokens=False, return_tensors="pt")["input_ids"]
            hs = torch.stack(dense(ids, output_hidden_states=True).hidden_states[:-1])[:, 0]  # (L, S, D)
            rows.append(hs.mean(1) if mode == "hidden_avg" else hs[:, -1])
        return torch.stack(rows).mean(0)

    v = mean(prompts) - (mean(negative) if negative else 0)
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_routers_are_each_layers_input_at_the_prompts(tmp_path, tokenizer_dir, mode):
    dense, path = _dense(tmp_path, tokenizer_dir)
    upcycle(path, tmp_path / "moe", experts=3, top_k=2, router=mode, prompts=_write_prompts(tmp_path), progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    with torch.no_grad():
        want = torch.stack([_expected(dense, tok, p, mode=mode) for p in PROMPTS], dim=1)  # (L, E, D)
        for layer, block in enumerate(find_moe_blocks(moe)):
            torch.testing.assert_close(block.router_ED(), want[layer], rtol=0, atol=1e-5)
        assert not torch.allclose(want[0], want[1], atol=1e-2)  # each layer its own rows
        # the experts are copies: the dense logits, whatever the routers
        torch.testing.assert_close(moe(_ids()).logits, dense(_ids()).logits, rtol=0, atol=1e-5)


def test_embed_routers_and_mergekits_config_with_negative_prompts(tmp_path, tokenizer_dir):
    dense, path = _dense(tmp_path, tokenizer_dir)
    config = {"base_model": str(path), "gate_mode": "cheap_embed", "experts": [
        {"source_model": str(path), "positive_prompts": PROMPTS[0], "negative_prompts": ["a small model"]},
        {"source_model": str(path), "positive_prompts": PROMPTS[1]},
        {"source_model": str(path), "positive_prompts": PROMPTS[2]}]}
    (tmp_path / "moe.yaml").write_text(json.dumps(config))  # JSON is YAML: mergekit-moe's own file
    upcycle(path, tmp_path / "moe", experts=3, top_k=2, router="embed", prompts=[tmp_path / "moe.yaml"], progress=False)
    blocks = find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "moe"))
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    emb = dense.model.embed_tokens.weight.detach()

    def summed(texts):
        return sum(emb[tok((tok.bos_token or "") + t, add_special_tokens=False)["input_ids"]].sum(0) for t in texts)

    v = summed(PROMPTS[0]) - summed(["a small model"])
    torch.testing.assert_close(blocks[1].router_ED()[0], v / v.norm(), rtol=0, atol=1e-5)
    assert torch.equal(blocks[0].router_ED(), blocks[1].router_ED())  # the same rows in every layer


def test_a_mapping_file_and_the_seed(tmp_path, tokenizer_dir):
    _, path = _dense(tmp_path, tokenizer_dir)
    (tmp_path / "experts.json").write_text(json.dumps({"foxes": PROMPTS[0], "small": PROMPTS[1], "dogs": PROMPTS[2]}))
    routers = []
    for seed in (0, 1):
        upcycle(path, tmp_path / f"moe{seed}", experts=3, top_k=2, router="hidden", seed=seed,
                prompts=[tmp_path / "experts.json"], progress=False)
        routers.append(find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / f"moe{seed}"))[0].router_ED())
    files = _write_prompts(tmp_path)
    upcycle(path, tmp_path / "files", experts=3, top_k=2, router="hidden", prompts=files, progress=False)
    from_files = find_moe_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "files"))[0].router_ED()
    assert torch.equal(routers[0], routers[1]) and torch.equal(routers[0], from_files)


@pytest.mark.parametrize("files, extra, match", [
    (None, ["--router", "hidden"], "--router hidden initialises each expert's router from prompts"),
    ("three", [], "--prompts is read only by --router hidden"),
    ("two", ["--router", "hidden"], "--prompts describes 2 experts but the MoE has 3"),
    ("missing", ["--router", "hidden"], "nowhere.txt does not exist"),
    ("latin1", ["--router", "embed"], "is not UTF-8 (at byte 3)"),
    ("empty", ["--router", "hidden"], "holds no prompt for expert 1"),
    ("same", ["--router", "hidden"], "gives every expert the same prompts"),
    ("bad_json", ["--router", "hidden"], "cannot be parsed"),
    ("long", ["--router", "hidden"], "describe an expert in at most 2048 tokens"),
    ("three", ["--router", "magic"], "--router 'magic'"),
])
def test_bad_prompts_say_one_line_and_write_nothing(tmp_path, tokenizer_dir, capsys, files, extra, match):
    _, path = _dense(tmp_path, tokenizer_dir)
    paths = [str(p) for p in _write_prompts(tmp_path)]
    if files == "two":
        paths = paths[:2]
    elif files == "missing":
        paths[1] = str(tmp_path / "nowhere.txt")
    elif files == "latin1":
        (tmp_path / "expert1.txt").write_bytes("caf\xe9".encode("latin-1"))
    elif files == "empty":
        (tmp_path / "expert1.txt").write_text("\n  \n")
    elif files == "same":
        for p in paths:
            (tmp_path / p).write_text("the same\n")
    elif files == "bad_json":
        (tmp_path / "e.json").write_text("{not json")
        paths = [str(tmp_path / "e.json")]
    elif files == "long":
        (tmp_path / "expert2.txt").write_text("the dog " * 3000)
    argv = ["upcycle", str(path), "--experts", "3", "--top-k", "2", "--out", str(tmp_path / "moe"), *extra]
    err = _error(capsys, [*argv, "--prompts", *paths] if files else argv)
    assert match in err, err
    assert not (tmp_path / "moe").exists()


def test_hidden_routers_that_cannot_fit_in_memory_are_refused(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import sdmoe.models.upcycle as up

    _, path = _dense(tmp_path, tokenizer_dir)
    monkeypatch.setattr(up, "available_memory", lambda: 400_000)  # room for a layer's experts, not the model
    err = _error(capsys, ["upcycle", str(path), "--experts", "3", "--top-k", "2", "--out", str(tmp_path / "moe"),
                          "--router", "hidden", "--prompts", *map(str, _write_prompts(tmp_path))])
    assert "--router hidden runs the dense model in float32" in err and "use --router embed" in err
    assert main(["upcycle", str(path), "--experts", "3", "--top-k", "2", "--out", str(tmp_path / "moe"), "--quiet",
                 "--router", "embed", "--prompts", *map(str, _write_prompts(tmp_path))]) == 0
