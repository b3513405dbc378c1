"""An upcycled MoE's routers from prompts that describe each expert: mergekit-moe's `gate_mode`.

    sdmoe upcycle dense/ --experts 3 --top-k 1 --router hidden --prompts code.txt maths.txt prose.txt --out moe/
    sdmoe upcycle dense/ --experts 3 --top-k 1 --router hidden --prompts experts.yaml --out moe/

Prompts: one text file per expert (one prompt a line, blank lines skipped), or one `.json`/`.yaml` file: a
mapping of expert name to its prompts (in the experts' order), a list of prompt lists, or mergekit-moe's own
config (`experts: [{positive_prompts: [...], negative_prompts: [...]}]`, other keys ignored); an entry may
be a list of prompts or `{positive_prompts, negative_prompts}`.

Modes (mergekit/moe/router.py `get_gate_params`, followed step for step):

- `random`: each router N(0, initializer_range^2), from `--seed` (mergekit: N(0, 1) from torch's global,
  unseeded generator);
- `hidden` (mergekit `hidden`): the dense model run on `bos + prompt` (no other special tokens, left padded
  with bos, or eos where there is none); for each decoder layer the hidden state entering it (the
  residual stream before the layer's input norm: `output_hidden_states[:-1]`, the embeddings for layer 0)
  at each prompt's last token, averaged over the expert's prompts, minus the same average over its
  negative prompts, scaled to unit length: row e of layer l's router;
- `hidden_avg` (mergekit `hidden_avg`): the same, averaged over each prompt's tokens first;
- `embed` (mergekit `cheap_embed`): the sum of the prompts' token embeddings (minus the negative prompts'),
  unit length, the same row in every layer; no forward pass.

Differences from mergekit: the dense model runs in float32 on the CPU in batches of 8 (mergekit: bfloat16 on
`--device`, all of an expert's prompts in one batch); `hidden_avg` averages over the prompts' tokens only
(mergekit's mean also counts the padding positions of shorter prompts); qwen2_moe's `shared_expert_gate`
stays zero (mergekit draws it from the shared expert's prompts), which keeps the upcycled model's function
exact (see `sdmoe.models.upcycle`). Routers from prompts are deterministic: `--seed` does not change them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import torch

from sdmoe.errors import UserError
from sdmoe.files import read_bounded, shown

Router = Literal["random", "hidden", "hidden_avg", "embed"]
ROUTERS = get_args(Router)
FROM_PROMPTS = ("hidden", "hidden_avg", "embed")
MAX_PROMPT_TOKENS = 2048  # a prompt describes an expert; a longer one is a document given by mistake
_MAX_FILE_BYTES = 16 * 2**20
BATCH = 8
_MAPPING_SUFFIXES = (".json", ".yaml", ".yml")
_FIX = ("give one UTF-8 text file per expert (one prompt a line), or one .json/.yaml file mapping each expert to "
        "its prompts")


@dataclass(frozen=True)
class ExpertPrompts:
    """What describes one expert: prompts its router should favour, and (optionally) ones it should not."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


def check_router_request(router: str, prompts: Sequence[str]) -> None:
    """The router mode and --prompts agree (the mode itself is a declared Literal, checked already)."""
    if router in FROM_PROMPTS and not prompts:
        raise UserError(f"--router {router} initialises each expert's router from prompts that describe it; add "
                        "--prompts FILE... (one file per expert, one prompt a line) or --prompts experts.yaml")
    if router == "random" and prompts:
        raise UserError("--prompts is read only by --router hidden, hidden_avg or embed; add --router hidden, or "
                        "drop --prompts")


def read_prompts(paths: Sequence[str | Path], experts: int) -> list[ExpertPrompts]:
    """Each expert's prompts from `--prompts`: E text files, or one .json/.yaml file; one line per refusal."""
    paths = [Path(p).expanduser() for p in paths]
    if len(paths) == 1 and paths[0].suffix.lower() in _MAPPING_SUFFIXES:
        found = _from_mapping(_parse(paths[0]), paths[0])
        where = [f"{shown(paths[0])} entry {i}" for i in range(len(found))]
    elif any(p.suffix.lower() in _MAPPING_SUFFIXES for p in paths):
        raise UserError(f"--prompts got {len(paths)} files, some .json/.yaml: give one .json/.yaml file mapping "
                        "every expert to its prompts, or one text file per expert")
    else:
        found = [ExpertPrompts(_lines(_text(p))) for p in paths]
        where = [shown(p) for p in paths]
    if len(found) != experts:
        raise UserError(f"--prompts describes {len(found)} experts but the MoE has {experts} (--experts); {_FIX}")
    for i, (e, w) in enumerate(zip(found, where)):
        if not e.positive:
            raise UserError(f"--prompts {w} holds no prompt for expert {i}; write at least one line that describes "
                            "what this expert should take")
    if len(found) > 1 and all(e == found[0] for e in found[1:]):
        raise UserError("--prompts gives every expert the same prompts, so their routers would be identical and "
                        "route nothing apart; give each expert prompts of its own")
    return found


def _text(path: Path) -> str:
    if not path.exists() and not path.is_symlink():
        raise UserError(f"--prompts {shown(path)} does not exist; {_FIX}")
    data = read_bounded(path, _MAX_FILE_BYTES, _FIX, f"is over {_MAX_FILE_BYTES // 2**20} MiB; prompts describe "
                                                      "experts in a few lines each")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts {shown(path)} is not UTF-8 (at byte {e.start}); save it as UTF-8") from None


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _parse(path: Path) -> Any:
    text = _text(path)
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml  # transformers' own dependency

        return yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json's ValueError, PyYAML's YAMLError
        why = " ".join(str(e).split())[:120]
    raise UserError(f"--prompts {shown(path)} cannot be parsed ({why}); fix it, or {_FIX}")


def _from_mapping(data: Any, path: Path) -> list[ExpertPrompts]:
    """A mapping name -> prompts, a list of prompt lists, or mergekit-moe's config."""
    if isinstance(data, dict) and isinstance(data.get("experts"), list) and all(
            isinstance(e, dict) for e in data["experts"]):
        data = data["experts"]  # mergekit-moe's config: its experts' prompts, in its order
    entries = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--prompts {shown(path)} holds no list of experts; write a mapping of expert name to a list "
                        "of prompts (or mergekit-moe's experts: [{positive_prompts: [...]}])")
    return [_entry(e, path, i) for i, e in enumerate(entries)]


def _entry(entry: Any, path: Path, i: int) -> ExpertPrompts:
    if isinstance(entry, str):
        entry = [entry]
    if isinstance(entry, dict):
        pos, neg = entry.get("positive_prompts") or [], entry.get("negative_prompts") or []
    else:
        pos, neg = entry, []
    if not isinstance(pos, list) or not isinstance(neg, list) or not all(isinstance(p, str) for p in pos + neg):
        raise UserError(f"--prompts {shown(path)} entry {i} is not a list of prompts (text); give each expert a list "
                        "of strings, or {positive_prompts: [...], negative_prompts: [...]}")
    return ExpertPrompts(tuple(p.strip() for p in pos if p.strip()), tuple(p.strip() for p in neg if p.strip()))


def prompt_tokenizer(dense_dir: Path):
    """The dense checkpoint's tokenizer, padding on the left with bos (else eos) as mergekit-moe does, so
    that the last position of every row is its prompt's last token."""
    from sdmoe.models.pretrained import load_tokenizer

    tokenizer = load_tokenizer(dense_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.bos_token or tokenizer.eos_token
    return tokenizer


def check_prompt_lengths(prompts: list[ExpertPrompts], tokenizer) -> None:
    """No prompt longer than MAX_PROMPT_TOKENS (its attention would take memory quadratic in its length)."""
    for i, e in enumerate(prompts):
        for text in (*e.positive, *e.negative):
            n = len(encode(tokenizer, [text])["input_ids"][0])
            if n > MAX_PROMPT_TOKENS:
                raise UserError(f"--prompts: a prompt of expert {i} ({text[:40]!r}...) is {n} tokens; describe an "
                                f"expert in at most {MAX_PROMPT_TOKENS} tokens a prompt")


def encode(tokenizer, texts: Sequence[str]):
    # mergekit's tokenize_prompts: bos written into the text, no other special tokens
    return tokenizer([(tokenizer.bos_token or "") + t for t in texts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def router_vectors(mode: str, dense_dir: Path, weights, prompts: list[ExpertPrompts], tokenizer,
                   layers: int) -> torch.Tensor:
    """The routers' rows from prompts, float32 (layers, experts, hidden): unit vectors (see the module doc)."""
    if mode == "embed":
        embed_VD = weights.get("model.embed_tokens.weight").float()

        def describe(texts):  # (1, D): the same vector for every layer
            return _embedding_sum(embed_VD, encode(tokenizer, texts))
    else:
        from sdmoe.models.pretrained import load_pretrained_model

        model = load_pretrained_model(dense_dir, torch.float32, checked=True).eval()

        def describe(texts):  # (L, D)
            return _mean_hidden(model, tokenizer, texts, average=mode == "hidden_avg")
    rows = []
    for e in prompts:
        v = describe(e.positive)
        if e.negative:
            v = v - describe(e.negative)
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(v.expand(layers, -1))
    return torch.stack(rows, dim=1)  # (L, E, D)


def _embedding_sum(embed_VD: torch.Tensor, enc) -> torch.Tensor:
    """mergekit's get_cheap_embedding: the sum of every (unpadded) token's embedding over all the prompts."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return (embed_VD[ids] * mask.unsqueeze(-1)).sum(dim=(0, 1)).unsqueeze(0)


@torch.no_grad()
def _mean_hidden(model, tokenizer, texts: Sequence[str], average: bool) -> torch.Tensor:
    """mergekit's get_hidden_states: each layer's input at the last token (or averaged over the tokens),
    averaged over the prompts; (L, D)."""
    total = None
    for start in range(0, len(texts), BATCH):
        enc = encode(tokenizer, texts[start:start + BATCH])
        # the decoder stack alone: the LM head's logits (tokens x vocabulary) are not needed
        out = model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               output_hidden_states=True)
        h_LBSD = torch.stack(out.hidden_states[:-1]).float()  # the input of each decoder layer
        if average:
            mask = enc["attention_mask"].to(h_LBSD.dtype)[None, :, :, None]
            h_LBD = (h_LBSD * mask).sum(2) / mask.sum(2)
        else:
            h_LBD = h_LBSD[:, :, -1]  # left padding: the last position is every prompt's last token
        total = h_LBD.sum(1) if total is None else total + h_LBD.sum(1)
    return total / len(texts)
