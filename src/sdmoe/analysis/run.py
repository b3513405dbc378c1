"""The whole analysis: the paper's three findings and the functional signs.

- `analyze_model(model, batches, ...)`: a live transformers MoE model and
  batches of token ids -> `AnalysisResult`.
- `analyze_path(path, ...)`: a local checkpoint directory (what
  `save_pretrained` writes, with its tokenizer). Finding 1 reads the expert
  weights lazily, one layer at a time (`sdmoe.moe.checkpoint`); findings 2, 3
  and the functional signs load the model in float32 and run it on text from
  `sdmoe.data` (bundled corpora or the user's files), tokenised with the
  checkpoint's own tokenizer. Writes `analysis.json`, PNG plots and
  `report.html` into `out`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sdmoe.analysis.capture import capture, model_top_k
from sdmoe.analysis.functional import FunctionalFindings, functional_findings
from sdmoe.analysis.gating import GatingFindings, gating_findings
from sdmoe.analysis.gradients import (
    DataSpectrum,
    GradientFindings,
    findings_from_capture,
)
from sdmoe.analysis.parameters import ProjectionFindings, check_rank, parameter_findings
from sdmoe.device import resolve_device
from sdmoe.errors import UserError
from sdmoe.files import json_safe
from sdmoe.moe import find_moe_blocks
from sdmoe.moe.checkpoint import ExpertCheckpoint, check_model_dir, weights_of_block

RESULT_FILE = "analysis.json"
COSINE_TOKENS = 256  # tokens each expert is run on for the output-similarity matrix


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass
class AnalysisResult:
    meta: dict
    parameters: list[ProjectionFindings] = field(default_factory=list)
    gradients: list[GradientFindings] = field(default_factory=list)
    data: list[DataSpectrum] = field(default_factory=list)
    gating: list[GatingFindings] = field(default_factory=list)
    functional: list[FunctionalFindings] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # name -> path written

    def to_dict(self) -> dict:
        return json_safe(
            {
                "meta": self.meta,
                "summary": self.summary(with_files=False),
                "parameters": [r.to_dict() for r in self.parameters],
                "gradients": [r.to_dict() for r in self.gradients],
                "data": [r.to_dict() for r in self.data],
                "gating": [r.to_dict() for r in self.gating],
                "functional": [r.to_dict() for r in self.functional],
            }
        )

    # -- terminal summary ----------------------------------------------------
    def summary(self, with_files: bool = True) -> str:
        m = self.meta
        lines = [
            f"SD-MoE analysis of {m.get('model', '?')} ({m.get('model_type', '?')}): "
            f"{len(m.get('layers', []))} MoE layers, E={m.get('num_experts')}, D={m.get('hidden_size')}, "
            f"k={m.get('k')}, r={m.get('r')}"
            + (f", {m['n_tokens']} tokens" if m.get("n_tokens") else "")
        ]
        if self.parameters:
            base = self.parameters[0].baseline
            lines.append(f"Finding 1  parameter overlap, mean off-diagonal (random k/d = {base:.4f}):")
            lines.append(_table(self.parameters, lambda r: f"{r.mean_overlap:.3f} ({r.ratio:.1f}x)"))
            ce = _mean(_mean(r.common_energy) for r in self.parameters)
            lines.append(
                f"  energy in the common top-{self.parameters[0].r} subspace: {ce:.3f} on average "
                f"(random r/d = {self.parameters[0].common_baseline:.4f})"
            )
        if self.gradients:
            lines.append(f"Finding 2  gradient overlap (random {self.gradients[0].baseline:.4f}):")
            lines.append(_table(self.gradients, lambda r: f"{_fmt(r.mean_overlap, '.3f')} ({_fmt(r.ratio, '.1f')}x)"))
            lr = _mean(_mean(r.lowrank_share) for r in self.gradients)
            lines.append(
                f"  gradient energy in top-{self.gradients[0].r} singular values: {lr:.3f} "
                f"(flat spectrum {self.gradients[0].lowrank_baseline:.3f})"
            )
        if self.data:
            shares = ", ".join(f"L{r.layer} {r.topk_share:.2f}" for r in self.data)
            lines.append(
                f"  data E[xx^T]: trace share in top-{self.data[0].k}: {shares} (isotropic {self.data[0].baseline:.4f})"
            )
        if self.gating:
            g0 = self.gating[0]
            lines.append(f"Finding 3  router rows' energy share in the top-k data / common subspace (random {g0.data_baseline:.4f}):")
            for g in self.gating:
                common = " ".join(f"U_{p} {v:.2f}" for p, v in g.common_alignment_mean.items())
                lines.append(
                    f"  L{g.layer:<3} data {g.data_alignment_mean:.2f}  {common}  | routing from top-{g.k} data dirs "
                    f"agrees {_fmt(g.agreement_exact)} exact, {_fmt(g.agreement_jaccard)} Jaccard "
                    f"(random dirs {_fmt(g.random_agreement_exact)}, {_fmt(g.random_agreement_jaccard)})"
                )
        if self.functional:
            lines.append("Functional  load entropy | shared experts (>2/E) | output cosine | domain MI (norm.)")
            for f in self.functional:
                shared = ",".join(map(str, f.shared_experts)) or "none"
                mi = f"{_fmt(f.domain_mi_nats, '.3f')} nats ({_fmt(f.domain_mi_normalized)})" if f.domain_mi_nats is not None else "-"
                lines.append(
                    f"  L{f.layer:<3} {f.load_entropy:.2f} | {shared} | {_fmt(f.output_cosine_mean)} | {mi}"
                )
        if with_files and self.files:
            out = Path(next(iter(self.files.values()))).parent
            lines.append(f"Wrote {RESULT_FILE}, report.html and {len(self.files) - 2} plots to {out}")
        return "\n".join(lines)

    # -- output ------------------------------------------------------------------
    def save(self, out: str | Path, force: bool = False) -> dict[str, str]:
        """Write `analysis.json`, the PNG plots and `report.html` into `out`."""
        from sdmoe.files import write_text_atomic
        from sdmoe.report.analysis import write_report

        out = Path(out)
        check_out_dir(out, force)
        d = self.to_dict()
        files = {name: str(p) for name, p in write_report(d, out).items()}
        # analysis.json last: its presence marks a complete output directory
        files[RESULT_FILE] = str(write_text_atomic(out / RESULT_FILE, json.dumps(d, indent=1) + "\n"))
        self.files = files
        return files


def _table(records, cell) -> str:
    """Rows = layers, columns = projections."""
    projs = list(dict.fromkeys(r.projection for r in records))
    by = {(r.layer, r.projection): r for r in records}
    layers = list(dict.fromkeys(r.layer for r in records))
    rows = ["  layer  " + "".join(f"{p:<16}" for p in projs)]
    for layer in layers:
        rows.append(f"  L{layer:<6}" + "".join(f"{cell(by[(layer, p)]):<16}" if (layer, p) in by else f"{'-':<16}" for p in projs))
    return "\n".join(rows)


def check_out_dir(out: str | Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; pass a directory path")
    if (out / RESULT_FILE).exists() and not force:
        raise UserError(f"output dir {out} holds a previous analysis; pass --force or another --out")


# -- live model ------------------------------------------------------------------
def _live_findings(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    domain_ids: Sequence[torch.Tensor] | None,
    domain_names: list[str] | None,
    k: int,
    r: int,
    layers: list[int] | None,
    params: list[ProjectionFindings],
    progress: bool,
):
    blocks = find_moe_blocks(model, layers)
    bar = tqdm(total=len(batches), desc="forward+backward", unit="batch", disable=not progress or None, leave=False)
    caps = capture(model, batches, domain_ids, layers, with_grads=True, progress=bar)
    bar.close()
    grads, data = findings_from_capture(caps, k, r)
    data_by_layer = {x.layer: x for x in data}
    bases: dict[int, dict[str, torch.Tensor]] = {}
    for p in params:
        if p.basis_DR is not None:
            bases.setdefault(p.layer, {})[p.projection] = p.basis_DR
    top_k = model_top_k(model)
    gating, functional = [], []
    for block in blocks:
        cap = caps[block.layer]
        x = cap.sample_TD()
        w = weights_of_block(block)
        gating.append(
            gating_findings(w.router_ED, data_by_layer[block.layer].basis_DK, bases.get(block.layer), x, top_k, block.layer)
        )
        functional.append(
            functional_findings(
                cap.indices_TK(), block.num_experts, block.layer, cap.domains_T(), domain_names, w, x[:COSINE_TOKENS]
            )
        )
    return grads, data, gating, functional


def _validate_rank(rank: int, d: int) -> int:
    return check_rank(rank, d, "rank")


def analyze_model(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    domain_ids: Sequence[torch.Tensor] | None = None,
    k: int = 8,
    layers: list[int] | None = None,
    r: int | None = None,
    domain_names: list[str] | None = None,
    progress: bool = True,
    name: str = "",
) -> AnalysisResult:
    """All findings on a live model; `batches`: B x S token-id tensors, `domain_ids`: one B-vector per batch."""
    t0 = time.perf_counter()
    blocks = find_moe_blocks(model, layers)
    d = blocks[0].hidden_size
    _validate_rank(k, d)
    r = _validate_rank(r if r is not None else k, d)
    batches = list(batches)
    if not batches:
        raise UserError("no batches of text to analyse; pass at least one batch")
    bar = tqdm(total=len(blocks), desc="parameter spectra", unit="layer", disable=not progress or None, leave=False)
    params = parameter_findings((weights_of_block(b) for b in blocks), k, r, progress=bar)
    bar.close()
    grads, data, gating, functional = _live_findings(model, batches, domain_ids, domain_names, k, r, layers, params, progress)
    cfg = getattr(model, "config", None)
    meta = {
        "model": name or type(model).__name__,
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "layers": [b.layer for b in blocks],
        "num_experts": blocks[0].num_experts,
        "hidden_size": d,
        "expert_ffn": blocks[0].expert_ffn,
        "top_k": model_top_k(model),
        "k": k,
        "r": r,
        "n_batches": len(batches),
        "n_tokens": int(sum(b.numel() for b in batches)),
        "domains": list(domain_names) if domain_names else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return AnalysisResult(meta, params, grads, data, gating, functional)


# -- checkpoint on disk ---------------------------------------------------------------
def _load_model_and_tokenizer(path: Path):
    # One loader for every command that reads a user's checkpoint: it checks
    # for tokenizer files first (transformers 5 would build an empty tokenizer
    # from config.json alone) and turns load failures into one-line errors.
    from sdmoe.models.generate import load_pretrained

    model, tokenizer = load_pretrained(path)
    return model, tokenizer


def analyze_path(
    path: str | Path,
    text: list[str] | None = None,
    layers: list[int] | None = None,
    rank: int = 8,
    out: str | Path | None = None,
    n_batches: int = 4,
    seq_len: int = 128,
    batch_size: int = 8,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    write: bool = True,
    weights_only: bool = False,
    device: str = "auto",
) -> AnalysisResult:
    """Analyse a local checkpoint directory; write `analysis.json`, plots and `report.html` to `out`.

    `device`: where the model's forward and backward run (auto = CUDA when torch sees one).

    `out=None`: PATH/../analysis (the CLI's default); `write=False`: write nothing.
    `weights_only`: finding 1 alone, read layer by layer; the model is never loaded whole
    (the way to analyse a checkpoint larger than memory).
    """
    t0 = time.perf_counter()
    path = Path(path).expanduser()
    if not write:
        out = None
    elif out is None:
        out = path.resolve().parent / "analysis"
    if out is not None:
        check_out_dir(out, force)  # before any work
    target = resolve_device(device)  # a missing GPU fails before any work too
    ckpt = _checked_checkpoint(path, layers, rank, weights_only, n_batches=n_batches, seq_len=seq_len,
                               batch_size=batch_size)
    with ckpt:
        bar = tqdm(total=len(layers or ckpt.layers), desc="parameter spectra", unit="layer", disable=not progress or None, leave=False)
        params = parameter_findings(ckpt.iter_layers(layers, dtype=torch.float32), rank, rank, progress=bar)
        bar.close()
    meta = {"model": str(path), "model_type": ckpt.config.get("model_type", ""), "layers": layers or ckpt.layers,
            "num_experts": ckpt.num_experts, "hidden_size": ckpt.hidden_size, "expert_ffn": ckpt.expert_ffn,
            "top_k": ckpt.top_k, "k": rank, "r": rank, "n_batches": 0, "n_tokens": 0}
    if weights_only:
        result = AnalysisResult({**meta, "weights_only": True}, params, [], [], [], [])
    else:
        result = _live_analysis(path, meta, params, target, text, layers, rank, n_batches, seq_len, batch_size, seed,
                                progress)
    result.meta["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        result.save(out, force=force)
    return result


def _checked_checkpoint(path: Path, layers: list[int] | None, rank: int, weights_only: bool,
                        **sizes: int) -> ExpertCheckpoint:
    """The checkpoint's expert weights opened lazily, after every check of the request that needs no model."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seq_len" else 1):
            raise UserError(f"{name}={v!r} is invalid; pass a positive integer{' >= 2' if name == 'seq_len' else ''}")
    if layers is not None and not list(layers):
        raise UserError("layers=[] names no layer; pass MoE layer indices, or None for all")
    ckpt = ExpertCheckpoint(path)  # reads JSON and safetensors headers only: runs no checkpoint code
    if not weights_only:
        # Everything the model load later needs (no custom code, a known model type, tokenizer
        # files), checked before minutes of parameter spectra rather than after.
        check_model_dir(path)
    _validate_rank(rank, ckpt.hidden_size)
    if layers is not None:
        missing = sorted(set(layers) - set(ckpt.layers))
        if missing:
            raise UserError(f"layers {missing} hold no MoE block in {path}; MoE layers are {ckpt.layers}")
    return ckpt


def _live_analysis(path: Path, meta: dict, params, target, text, layers, rank: int, n_batches: int, seq_len: int,
                   batch_size: int, seed: int, progress: bool) -> AnalysisResult:
    """Findings 2, 3 and the functional signs: the model loaded and run on the text, with its own tokenizer."""
    from sdmoe.data import DataConfig, prepare_dataset

    model, tokenizer = _load_model_and_tokenizer(path)
    model.to(target)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UserError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model embeds only {vocab}; "
            "save the model's own tokenizer with it"
        )
    ds = prepare_dataset(DataConfig(text=list(text or []), seq_len=seq_len, batch_size=batch_size), seed, tokenizer=tokenizer)
    have = sum(len(t) for t in ds.train_tokens.values())
    need = n_batches * batch_size * seq_len
    if have < need:
        raise UserError(
            f"the text has {have} tokens, fewer than the {need} that {n_batches} batches of {batch_size} x {seq_len} "
            "need; add text (--text) or lower n_batches / batch_size / seq_len"
        )
    sampled = [ds.train.sample(i) for i in range(n_batches)]
    grads, data, gating, functional = _live_findings(
        model, [ids for ids, _ in sampled], [dom for _, dom in sampled], ds.domains, rank, rank, layers, params,
        progress
    )
    meta = {**meta, "model_type": getattr(model.config, "model_type", ""), "top_k": model_top_k(model),
            "n_batches": n_batches, "n_tokens": need, "seq_len": seq_len, "batch_size": batch_size,
            "domains": ds.domains, "text": [str(t) for t in text] if text else "bundled corpora", "seconds": None}
    return AnalysisResult(meta, params, grads, data, gating, functional)
