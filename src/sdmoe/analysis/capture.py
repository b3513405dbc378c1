"""One pass of a live model over batches of text, recording what the findings need.

Per MoE layer, with hooks (removed afterwards):
- forward pre-hook on the MoE block: the layer-input second moment E[x x^T]
  (streamed, float64) and a sample of input tokens (for routing agreement and
  expert output similarity);
- forward hook on the router: each token's top-k expert set (transformers 5
  routers return (logits, scores, indices); a plain `nn.Linear` router of
  transformers-4 / remote-code models returns logits, and top-k is taken
  with the model config's `num_experts_per_tok`);
- optionally the causal-LM loss's gradient w.r.t. every expert matrix,
  summed over the batches, in canonical shapes.

The model is put in eval mode (no router jitter, no dropout) and restored;
`requires_grad` is switched on only for the analysed experts and restored;
`.grad` of those parameters is cleared before and after.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe import MoEBlock, find_moe_blocks
from sdmoe.moe.forward import logits as logits_of
from sdmoe.spectral import SecondMoment


def model_top_k(model: nn.Module, default: int = 2) -> int:
    cfg = getattr(model, "config", None)
    for name in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


@dataclass
class LayerCapture:
    """What one pass recorded for one MoE layer."""

    block: MoEBlock
    moment: SecondMoment = field(default_factory=SecondMoment)
    sample: list[torch.Tensor] = field(default_factory=list)  # token rows, T_s x D (float32)
    n_sampled: int = 0
    indices: list[torch.Tensor] = field(default_factory=list)  # per forward: T x top_k
    token_domains: list[torch.Tensor] = field(default_factory=list)  # per forward: T
    grads: dict[str, torch.Tensor] | None = None  # summed over batches, canonical E x F x D

    @property
    def layer(self) -> int:
        return self.block.layer

    def sample_TD(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.block.hidden_size)

    def indices_TK(self) -> torch.Tensor:
        return torch.cat(self.indices) if self.indices else torch.zeros(0, 1, dtype=torch.long)

    def domains_T(self) -> torch.Tensor | None:
        if not self.token_domains or len(self.token_domains) != len(self.indices):
            return None
        return torch.cat(self.token_domains)


def capture(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    domain_ids: Sequence[torch.Tensor] | None = None,
    layers: list[int] | None = None,
    with_grads: bool = True,
    sample_tokens: int = 1024,
    progress=None,
) -> dict[int, LayerCapture]:
    """Run `model` over `batches` (each B x S token ids) and record every MoE layer -> {layer: LayerCapture}."""
    blocks = find_moe_blocks(model, layers)
    top_k = model_top_k(model)
    caps = {b.layer: LayerCapture(b) for b in blocks}
    current_domains: list[torch.Tensor | None] = [None]
    hooks = []

    def pre_hook(cap: LayerCapture):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x_TD = x.detach().reshape(-1, x.shape[-1])
            cap.moment.update(x_TD)
            room = sample_tokens - cap.n_sampled
            if room > 0:
                cap.sample.append(x_TD[:room].float().cpu())
                cap.n_sampled += min(room, x_TD.shape[0])

        return hook

    def router_hook(cap: LayerCapture):
        def hook(_mod, _args, out):
            if isinstance(out, tuple) and len(out) >= 3 and not out[2].is_floating_point():
                idx = out[2]
            else:
                logits = out[0] if isinstance(out, tuple) else out
                idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
            idx = idx.detach().reshape(-1, idx.shape[-1]).cpu()
            cap.indices.append(idx)
            dom = current_domains[0]
            if dom is not None and dom.numel() and idx.shape[0] % dom.numel() == 0:
                cap.token_domains.append(dom.repeat_interleave(idx.shape[0] // dom.numel()))

        return hook

    was_training = model.training
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    expert_params = [p for b in blocks for p in b.host_parameters()]
    try:
        for cap in caps.values():
            hooks.append(cap.block.module.register_forward_pre_hook(pre_hook(cap), with_kwargs=True))
            hooks.append(cap.block.router.register_forward_hook(router_hook(cap)))
        model.eval()
        if with_grads:
            for p, _ in saved_flags:
                p.requires_grad_(False)
            for p in expert_params:
                p.requires_grad_(True)
                p.grad = None
        n = 0
        for i, ids in enumerate(batches):
            current_domains[0] = domain_ids[i].reshape(-1).cpu() if domain_ids is not None else None
            ids = ids.to(next(model.parameters()).device)
            with torch.set_grad_enabled(with_grads):
                logits = logits_of(model, ids)
                if with_grads:
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
                    loss.backward()
            n += 1
            if progress is not None:
                progress.update(1)
        if n == 0:
            raise UserError("no batches of text to analyse; pass at least one batch (n_batches >= 1)")
        if with_grads:
            for cap in caps.values():
                grads = cap.block.canonical("grad", local_shards=False)  # DTensors under FSDP2
                cap.grads = {k: v.float().clone() for k, v in grads.items()} if grads else None
    finally:
        for h in hooks:
            h.remove()
        if with_grads:
            for p in expert_params:
                p.grad = None
            for p, flag in saved_flags:
                p.requires_grad_(flag)
        model.train(was_training)
    return caps
