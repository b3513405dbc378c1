"""An exported SD-MoE model is a plain transformers directory: loads and generates without sdmoe."""

import json
import subprocess
import sys

import torch

from sdmoe.method import SDMoEConfig, convert, export
from sdmoe.models import ModelConfig, build_model

from ..method.method_helpers import train_steps

CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
ids = tok("the quick brown fox", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"prompt": ids[0].tolist(), "generated": out[0].tolist(), "logits_sum": float(logits.double().sum()),
                  "sdmoe_loaded": sorted(m for m in sys.modules if m == "sdmoe" or m.startswith("sdmoe."))}))
"""


def test_export_loads_and_generates_without_sdmoe(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = ModelConfig(style="qwen3_moe", hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=32)
    model = build_model(cfg, vocab_size=len(tok), seed=0, eos_token_id=tok.eos_token_id)
    ctl = convert(model, SDMoEConfig(gradient_split="fixed", rank=4))
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    train_steps(model, ctl, ids, steps=3)  # the weights move away from the conversion
    export(model)
    out_dir = tmp_path / "exported"
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    assert (out_dir / "model.safetensors").is_file()
    assert not any("sdmoe" in k for k in json.loads((out_dir / "config.json").read_text()))

    done = subprocess.run([sys.executable, "-c", CHILD, str(out_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["sdmoe_loaded"] == []

    model.eval()
    ids = torch.tensor([child["prompt"]])
    mine = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert child["generated"] == mine[0].tolist() and len(child["generated"]) == ids.shape[1] + 6
    with torch.no_grad():
        ref = float(model(input_ids=ids).logits.double().sum())
    assert abs(child["logits_sum"] - ref) <= 1e-4 * max(1.0, abs(ref))
