"""Every causal-LM MoE family of the installed transformers, discovered (`sdmoe.moe.families`), built tiny
on the CPU: found and stepped with SD-MoE, or refused in one line with the reason (default tier); taken
through training, export, reload, analysis and `train --init` (slow tier, `make test-slow`). The table of
docs/families.md comes from the same steps (`python -m tests.moe.family_chain`)."""

from __future__ import annotations

import math

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.models.config import STYLE_CHOICES
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.checkpoint import ExpertCheckpoint
from sdmoe.moe.families import build_tiny, moe_model_types

from .family_chain import (
    KNOWN_GAPS,
    REFUSED,
    analyze,
    attach_and_train,
    export_save_reload,
    finite_losses,
    tokenizer_for,
    train_init,
    write_text,
)

FAMILIES = moe_model_types()


@pytest.fixture(autouse=True)
def _quiet_one_thread(one_thread):
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # a tiny config's warnings (unused fields, padding ids) say nothing here
    yield
    logging.set_verbosity(level)


def test_discovery_finds_the_families_and_no_alias_twice():
    # the families this transformers ships (docs/families.md): a release with fewer means discovery broke
    assert len(FAMILIES) >= 40 and {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "jetmoe",
                                    "hunyuan_v1_moe", "granitemoe", "phimoe"} <= set(FAMILIES)
    assert "llama4" not in FAMILIES and "param2moe" not in FAMILIES  # their classes belong to llama4_text, glm4_moe
    assert not {"llama", "qwen3", "gpt2"} & set(FAMILIES)  # dense families declare no experts


def test_every_supported_family_is_a_style_train_init_continues():
    assert set(REFUSED) <= set(FAMILIES)
    missing = sorted(set(FAMILIES) - set(REFUSED) - set(STYLE_CHOICES))
    assert not missing, f"add {missing} to sdmoe.models.config.CONTINUED_STYLES (or to REFUSED, with the reason)"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_steps_with_sd_moe_or_is_refused_in_one_line(model_type):
    import sdmoe
    from sdmoe.method import SDMoEConfig

    model = build_tiny(model_type)
    if model_type in REFUSED:
        for call in (lambda: find_moe_blocks(model),
                     lambda: sdmoe.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), SDMoEConfig())):
            with pytest.raises(UserError) as e:
                call()
            assert REFUSED[model_type] in str(e.value) and "\n" not in str(e.value)
        return
    blocks = find_moe_blocks(model)
    assert blocks and all(b.num_experts == 4 and b.hidden_size == 64 for b in blocks)
    before = blocks[0].gate_EFD().detach().clone()  # a view of the storage where the layout allows
    handle, losses = attach_and_train(model, steps=1, split_step=0)
    assert handle.controller.split_done and math.isfinite(losses[0])
    assert not torch.equal(blocks[0].gate_EFD(), before)  # the step reached the experts


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    text = write_text(tmp_path_factory.mktemp("text"))
    return text, tokenizer_for(text)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in FAMILIES if t not in REFUSED])
def test_family_trains_exports_reloads_is_analysed_and_continues(model_type, tmp_path, text_and_tokenizer):
    text, tokenizer = text_and_tokenizer
    gaps = KNOWN_GAPS.get(model_type, {})
    model = build_tiny(model_type, vocab_size=len(tokenizer))
    handle, losses = attach_and_train(model, steps=3, split_step=1)
    assert handle.controller.split_done and all(math.isfinite(x) for x in losses)
    assert export_save_reload(model, handle, tmp_path / "model", tokenizer) < 1e-4
    for stage, text_dir in (("analyze", text), ("weights-only", None)):
        if stage in gaps:
            with pytest.raises(UserError, match=gaps[stage]):
                analyze(tmp_path / "model", text_dir)
            continue
        result = analyze(tmp_path / "model", text_dir)
        assert len(result.parameters) == 3 * len(find_moe_blocks(model))  # gate, up, down of every MoE layer
    if "weights-only" not in gaps:  # what --weights-only reads from the files is what the model computes with
        with ExpertCheckpoint(tmp_path / "model") as ckpt:
            for block in find_moe_blocks(model):
                lw = ckpt.read_layer(block.layer)
                for got, live in zip((lw.gate_EFD, lw.up_EFD, lw.down_EDF, lw.router_ED),
                                     (block.gate_EFD(), block.up_EFD(), block.down_EDF(), block.router_ED())):
                    assert got is not None and torch.equal(got, live.detach())
    for method in ("baseline", "sd-moe"):
        if "--init" in gaps:
            with pytest.raises(RuntimeError, match=gaps["--init"]):
                train_init(tmp_path / "model", tmp_path / method, text, method)
            continue
        records = train_init(tmp_path / "model", tmp_path / method, text, method)
        assert len(finite_losses(records)) == 3 and all(math.isfinite(x) for x in finite_losses(records))
        assert (method == "sd-moe") == any(r.get("event") == "split" for r in records)
