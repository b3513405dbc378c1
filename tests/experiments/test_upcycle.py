"""`sdmoe upcycle-compare --preset upcycle-tiny`: the parent, the upcycled starts, every arm and the report, end to
end; the old spelling `compare --preset upcycle-tiny`."""

import json

import pytest

from sdmoe.cli import main
from sdmoe.experiments.upcycle import ARMS


def test_the_upcycle_compare_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "upc"
    assert main(["upcycle-compare", "--preset", "upcycle-tiny", "--out", str(out), "--quiet"]) == 0
    payload = json.loads((out / "upcycle.json").read_text())
    rows = {r["arm"]: r for r in payload["rows"]}
    assert set(rows) == set(ARMS)
    assert rows["copy"]["overlap"]["start"] > 0.999  # copies start identical: the paper's failure at its purest
    assert rows["drop"]["overlap"]["start"] < 0.9  # Drop-Upcycling's re-drawn neurons tell them apart at once
    assert rows["dense"]["overlap"]["start"] is None
    for arm in ("copy+sd-moe", "drop", "drop+sd-moe", "dense"):
        assert rows[arm]["gain"]["n"] == 2 and rows[arm]["verdict"] in ("reproduced", "not reproduced",
                                                                        "inconclusive", "not measurable")
    assert payload["same_seed_noise"] == 0.0  # the copy baseline trained twice from the same start: bit-identical
    assert "| copy+sd-moe |" in (out / "upcycle.md").read_text()
    # a second call (the old spelling) trains nothing and writes the same report; `sdmoe report` rebuilds it
    before = (out / "upcycle.md").read_text()
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/*/run.json")}
    assert len(mtimes) == 2 * len(ARMS.arms) + 1  # every arm and seed, and the copy baseline's rerun
    assert main(["compare", "--preset", "upcycle-tiny", "--out", str(out), "--quiet"]) == 0
    assert (out / "upcycle.md").read_text() == before
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/*/run.json")} == mtimes
    (out / "upcycle.md").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert (out / "upcycle.md").read_text() == before and "| copy+sd-moe |" in capsys.readouterr().out


def test_an_moe_as_the_parent_is_refused_before_anything_is_written(tmp_path, tiny_dataset, capsys):
    from sdmoe.models import ModelConfig, build_model

    tok = tiny_dataset.tokenizer
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=1, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=16)
    build_model(cfg, len(tok), eos_token_id=tok.eos_token_id).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    capsys.readouterr()
    assert main(["upcycle-compare", "--preset", "upcycle-tiny", "--init", str(tmp_path / "moe"), "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already an MoE" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_its_arms_are_fixed(tmp_path, capsys):
    assert main(["compare", "--preset", "upcycle-tiny", "--variants", "baseline,control", "--out",
                 str(tmp_path / "x")]) == 2
    assert "its arms are fixed" in capsys.readouterr().err


@pytest.mark.slow  # a second end-to-end upcycle compare; the default tier has one
def test_a_users_dense_checkpoint_is_the_parent(tmp_path, tiny_dataset, capsys):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_dataset.tokenizer
    cfg = AutoConfig.for_model("mistral", vocab_size=len(tok), hidden_size=32, intermediate_size=32, head_dim=16,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mine")
    tok.save_pretrained(tmp_path / "mine")
    out = tmp_path / "upc"
    assert main(["upcycle-compare", "--preset", "upcycle-tiny", "--init", str(tmp_path / "mine"), "--out", str(out),
                 "--quiet"]) == 0
    assert not (out / "parent").exists()  # nothing trained before upcycling
    dense_arm = json.loads((out / "runs" / "dense" / "seed0" / "run.json").read_text())["config"]
    assert dense_arm["model"]["style"] == "mixtral" and dense_arm["model"]["num_experts"] == 1
    assert "the dense checkpoint" in (out / "upcycle.md").read_text()
