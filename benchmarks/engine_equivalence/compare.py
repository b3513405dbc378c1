"""Compare two run.py outputs: per variant the largest relative loss gap and the expert weights' gap over how far they moved."""
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from sdmoe.models import build_model
from sdmoe.train.config import preset

old_root, new_root = Path(sys.argv[1]), Path(sys.argv[2])
old = json.loads((old_root / "losses.json").read_text()); new = json.loads((new_root / "losses.json").read_text())
starts = {}
worst = (0, 0)
for key, nl in new.items():
    ol = old[key]
    lrel = max(abs(a - b) / abs(b) for a, b in zip(nl, ol))
    pname, name = key.split("/")
    if pname not in starts:
        cfg = preset(pname)
        tok = AutoTokenizer.from_pretrained(str(new_root / pname / name / "model"), trust_remote_code=False)
        starts[pname] = {k: v for k, v in build_model(cfg.model, len(tok), seed=cfg.loop.seed, eos_token_id=tok.eos_token_id).state_dict().items() if "experts" in k}
    wo = AutoModelForCausalLM.from_pretrained(str(old_root / pname / name / "model"), trust_remote_code=False).state_dict()
    wn = AutoModelForCausalLM.from_pretrained(str(new_root / pname / name / "model"), trust_remote_code=False).state_dict()
    moved = sum(float((wo[k] - s).square().sum()) for k, s in starts[pname].items()) ** 0.5
    gap = sum(float((wn[k] - wo[k]).square().sum()) for k in starts[pname]) ** 0.5
    other = max(float((wn[k] - wo[k]).abs().max()) for k in wo if "experts" not in k)
    print(f"{key:32s} steps {len(nl)}  loss rel gap {lrel:.1e}  expert weights gap/moved {gap/moved:.1e}  other params max abs gap {other:.1e}")
