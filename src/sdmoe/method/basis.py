"""Choosing the common basis U of each MoE layer.

Sources (`basis_source`):
- "weights":     top-R right singular vectors of the stacked experts [W_1; ...; W_E]
- "shared":      the shared weight S's own singular vectors, both sides (the paper's)
- "gradients":   top-R eigenvectors of sum over batches and experts of G_i^T G_i
- "activations": top-R eigenvectors of E[x x^T] of the layer input

`Collector` accumulates what the last two need over a window of training
steps: gradient Gram matrices (from `.grad`, after backward) and the layer
input's second moment (a forward pre-hook on the router, registered only
while collecting, active only in forward passes with grad enabled); or from
a reference batch when the warm-up left it empty (`fill_from`).
"""

from __future__ import annotations

import torch
from torch import nn

from sdmoe.errors import UserError
from sdmoe.moe.layout import MoEBlock
from sdmoe.spectral import SecondMoment, common_subspace, data_subspace

from . import schedule
from .hooks import SDMoEHook
from .probe import forward_logits, input_ids


class _InputMoment(SDMoEHook):
    def __init__(self, moment: SecondMoment, always: bool = False):
        self.moment = moment
        self.always = always

    def __call__(self, module, args):
        if args and (self.always or torch.is_grad_enabled()):
            self.moment.update(args[0].detach())


def gram(x_EFD: torch.Tensor) -> torch.Tensor:
    """sum_i X_i^T X_i (D x D, float32)."""
    x = x_EFD.float()
    return torch.matmul(x.transpose(1, 2), x).sum(0)


class Collector:
    """Gradient Grams and layer-input second moments over a window of steps, as `basis_source` needs them."""

    def __init__(self, blocks: list[MoEBlock], basis_source: str):
        self.blocks = blocks
        self.need_grads, self.need_inputs = basis_source == "gradients", basis_source == "activations"
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self.grad_batches = 0
        self.inputs = [SecondMoment() for _ in blocks]
        self._handles: list = []

    # the collection windows (`schedule.in_window`): the hooks on the routers' inputs only while one is open
    def in_window(self, cfg, step: int, split_done: bool) -> bool:
        """Whether `step`'s gradients or layer inputs are collected (for a split not yet done, or a re-estimation)."""
        return schedule.in_window(cfg, step, split_done, self.need_grads or self.need_inputs)

    def sync(self, cfg, next_step: int, split_done: bool) -> None:
        """Open or close the window for `next_step`'s forward."""
        if self.in_window(cfg, next_step, split_done):
            self.start()
        else:
            self.stop()

    def start(self, always: bool = False) -> None:
        if self.need_inputs and not self._handles:
            self._handles = [b.router.register_forward_pre_hook(_InputMoment(m, always), prepend=True)
                             for b, m in zip(self.blocks, self.inputs)]

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def add_grads(self) -> None:
        if not self.need_grads:
            return
        for li, b in enumerate(self.blocks):
            for p, g in b.canonical("grad").items():
                self.add_gram(li, p, g)
        self.grad_batches += 1

    def add_gram(self, li: int, p: str, g_EFD: torch.Tensor) -> None:
        """Add sum_i G_i^T G_i of layer li's projection p to its sum (the batch is counted by the caller)."""
        self.grads[(li, p)] = self.grads.get((li, p), 0) + gram(g_EFD)

    def has_inputs(self) -> bool:
        return all(m.count > 0 for m in self.inputs)

    def has_grads(self) -> bool:
        return self.grad_batches > 0

    def input_moment(self, li: int) -> torch.Tensor:
        return self.inputs[li].matrix

    def reset(self) -> None:
        self.grads, self.grad_batches = {}, 0
        self.inputs = [SecondMoment() for _ in self.blocks]

    def state_dict(self) -> dict:
        """JSON-serialisable (tensors as exact float lists); empty outside a collection window. `open`: the
        window is open for the next forward (after the split no event reopens it before the next step's)."""
        return {"grads": {f"{k[0]}.{k[1]}": encode(v) for k, v in self.grads.items()},
                "grad_batches": self.grad_batches,
                "inputs": [{"sum": encode(m._sum), "count": m.count} for m in self.inputs],
                "open": bool(self._handles)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore `state_dict()` onto the experts' device (a checkpoint written on a GPU resumes on a CPU)."""
        self.grads = {(int(k.split(".")[0]), k.split(".")[1]): decode(v) for k, v in sd.get("grads", {}).items()}
        self.grad_batches = int(sd.get("grad_batches", 0))
        for m, s in zip(self.inputs, sd.get("inputs", [])):
            m._sum, m.count = decode(s["sum"]), int(s["count"])
        self.to(next(self.blocks[0].experts.parameters()).device)
        if sd.get("open"):
            self.start()
        else:
            self.stop()

    def fill_from(self, model: nn.Module, batch) -> None:
        """What the basis needs, from a reference batch, when the warm-up left it empty: the layer inputs
        of one forward, or the gradients of its language-model loss (the model's own gradients kept)."""
        if self.need_inputs and not self.has_inputs():
            self.start(always=True)
            try:
                with torch.no_grad():
                    forward_logits(model, batch)
            finally:
                self.stop()
        if self.need_grads and not self.has_grads():
            params = [t for b in self.blocks for t in b.host_parameters()]
            saved = [p.grad for p in params]
            logits = forward_logits(model, batch)
            ids = input_ids(batch)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = torch.zeros_like(p) if g is None else g
            self.add_grads()
            for p, g in zip(params, saved):
                p.grad = g

    def to(self, device: torch.device) -> None:
        """Move the sums collected so far to `device`."""
        self.grads = {k: v.to(device) for k, v in self.grads.items()}
        for m in self.inputs:
            if m._sum is not None:
                m._sum = m._sum.to(device)


def encode(t: torch.Tensor | None) -> dict | None:
    """A tensor as JSON (repr of each float round-trips float32/float64 exactly)."""
    if t is None:
        return None
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.detach().cpu().flatten().tolist()}


def decode(d: dict | None) -> torch.Tensor | None:
    if d is None:
        return None
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


def choose_bases(block: MoEBlock, li: int, projs, width: int, r: int, cfg, collector: Collector,
                 shared: dict[str, torch.Tensor] | None = None, reduce=None,
                 two_sided: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per decomposed projection of one block: (U, D x width) and, `two_sided`, the ffn-side basis (F x r);
    float32.

    Sources (`cfg.basis_source`): the stacked experts' weights, the shared weight S (`shared`: F x D
    per projection; its own singular vectors, the paper's), the gradients or the layer inputs
    collected over the warm-up. Weights and S by an exact eigendecomposition or, with
    basis_method='randomized', a randomized range finder (Gaussian projection, power iterations, QR).
    reduce: the sum over the ranks holding the other experts (`sharding.reducer`) for the experts' weights."""
    source = cfg.basis_source
    if source in ("weights", "shared"):
        w = block.canonical("data") if source == "weights" else {p: s.unsqueeze(0) for p, s in shared.items()}
        red = reduce if source == "weights" else None  # S is already the same on every rank
        return {p: (_top(w[p], width, cfg, red), _top(w[p].transpose(1, 2), r, cfg, red) if two_sided else None)
                for p in projs}
    if source == "gradients":
        if not collector.has_grads():
            raise UserError("basis_source='gradients' has no gradients to use; set split_step >= 1 so warm-up "
                            "steps are observed, or pass reference_batch to split()")
        return {p: (data_subspace(collector.grads[(li, p)], width)[0].float(), None) for p in projs}
    if not collector.has_inputs():
        raise UserError("basis_source='activations' has seen no layer inputs; set split_step >= 1 so warm-up "
                        "steps are observed, or pass reference_batch to split()")
    u = data_subspace(collector.input_moment(li), width)[0].float()
    return {p: (u, None) for p in projs}


def _top(w_EFD: torch.Tensor, r: int, cfg, reduce=None) -> torch.Tensor:
    """The top-r right singular subspace of the stacked w_EFD (D x r, float32), exact or randomized."""
    if cfg.basis_method == "randomized":
        return common_subspace(w_EFD.float(), r, "randomized", oversample=cfg.range_oversample,
                               iters=cfg.range_power_iters, reduce=reduce)[0].float()
    return common_subspace(w_EFD.float(), r, reduce=reduce)[0].float()
