"""convert / export: function preservation, and a vanilla transformers reload of the exported model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from sdmoe.method import SDMoEConfig, convert, export
from sdmoe.method.hooks import SDMoEHook, split_by
from sdmoe.models import STYLES

from .method_helpers import batch, make_model, rel, train_steps


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("cfg", [
    SDMoEConfig(form="per_expert", rank=8),
    SDMoEConfig(form="full", rank=8),
    SDMoEConfig(form="full", gradient_split="none", rank=8),
    SDMoEConfig(form="full", rank=8, projections=("up", "down")),
], ids=["per_expert", "shared_full", "control", "up_down_only"])
def test_exact_conversions_preserve_logits(kind, cfg):
    model, ids = make_model(kind), batch()
    ref = _logits(model, ids)
    ctl = convert(model, cfg, reference_batch=ids)
    assert rel(_logits(model, ids), ref) < 1e-5
    assert all(r["rel_change"] < 1e-5 for r in ctl.last_split["layers"])
    assert ctl.split_done and ctl.num_shared_parameters() > 0
    _assert_clean(model)  # the split adds nothing to the model


def test_lossy_splits_are_measured(kind):
    """lowrank shared form drops each expert's deviation inside U: the change is logged, and real."""
    model, ids = make_model(kind), batch()
    ref = _logits(model, ids)
    ctl = convert(model, SDMoEConfig(form="lowrank", gradient_split="fixed", rank=4), reference_batch=ids)
    changes = [r["rel_change"] for r in ctl.last_split["layers"]]
    assert all(c > 1e-4 for c in changes)
    assert ctl.last_split["logits_rel_change"] == pytest.approx(rel(_logits(model, ids), ref), rel=1e-3)


def _assert_clean(model, hooks_too=False):
    assert not any("sdmoe" in type(m).__module__ for m in model.modules())
    if hooks_too:
        for m in model.modules():
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                assert not any(isinstance(h, SDMoEHook) for h in hooks.values())
        assert split_by(model) is None
    assert not any("sdmoe" in n for n, _ in model.named_parameters())
    assert not any("sdmoe" in n for n in model.state_dict())


def test_export_module_list_in_process():
    model, ids = make_model("module_list"), batch()
    ctl = convert(model, SDMoEConfig(rank=8, gradient_split="fixed"), reference_batch=ids)
    assert split_by(model) is ctl
    before = _logits(model, ids)
    export(model)
    _assert_clean(model, hooks_too=True)
    assert rel(_logits(model, ids), before) < 1e-5
    assert split_by(model) is None and convert(model, SDMoEConfig(rank=8)).split_done  # a new SDMoE may split it


_RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "sdmoe" not in sys.modules
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=False)
    model.eval()
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, job["out"])
assert not any(m.startswith("sdmoe") for m in sys.modules)
"""


@pytest.mark.slow
def test_export_reloads_in_vanilla_transformers(tmp_path):
    """Every style: save_pretrained -> a process without sdmoe."""
    ids = batch()
    jobs, expected = [], {}
    for style in STYLES:
        model = make_model(style)
        cfg = SDMoEConfig(rank=8, split_step=0)
        train_steps(model, convert(model, cfg, reference_batch=ids), ids)
        model.eval()
        want = _logits(model, ids)
        export(model)
        _assert_clean(model, hooks_too=True)
        d = tmp_path / style
        model.save_pretrained(d)
        out = tmp_path / f"{style}.pt"
        jobs.append({"dir": str(d), "ids": ids.tolist(), "out": str(out)})
        expected[str(out)] = want
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for out, want in expected.items():
        got = torch.load(out)
        assert rel(got, want) < 1e-5, out


def test_exporting_a_deepcopy_leaves_the_original_working():
    model, ids = make_model("qwen3_moe"), batch()
    ctl = convert(model, SDMoEConfig(rank=8))
    want = _logits(model, ids)
    clone = copy.deepcopy(model)
    assert split_by(clone) is None and split_by(model) is ctl  # the copy is a new model: not split by ctl
    export(clone)
    assert split_by(model) is ctl
    assert rel(_logits(clone, ids), want) < 1e-5
    assert rel(_logits(model, ids), want) < 1e-6
