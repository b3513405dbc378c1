"""Guo et al., "Advancing Expert Specialization for Better MoE" (arXiv 2505.22323, NeurIPS 2025): two loss terms
added to the training loss, beside the usual balance loss.

    L = L_lm + L_balance + w_o * orthogonality_loss(y_TKD) - w_v * variance_loss(p_TE)

- `orthogonality_loss`: each token's routed experts should produce outputs that do not overlap. For token t with
  top-k outputs y_t1..y_tk, each y_ti is projected onto the span of the other k - 1 (an orthonormal basis of them
  by Gram-Schmidt, in top-k order) and the projection's squared norm is summed; the mean over tokens and k.
- `variance_loss`: the variance of each token's routing probabilities over the experts (torch.var's unbiased
  estimate), mean over tokens; subtracted, so routing grows more decisive.
- The weights: the authors' code picks each term's weight once, at the first step, as the power of ten that brings
  the term near a target (`calibrated_weight`; targets 1e-4 for the orthogonality term, 1e-2 for the variance
  term, their defaults). A fixed weight may be given instead.

Checked against the authors' code (HongcanGuo/Auxloss-For-Advancing-Expert-Specialization, Model/ds/
modeling_deepseek.py, `MoEGate.compute_ortho_loss` and the variance term of `MoEGate.forward`): the same values for
the same [T, k, D] outputs and [T, E] probabilities (tests/remedies/test_specialisation.py re-implements their loop
literally as the reference). Two differences, deliberate: their `DeepseekMoE.forward` reshapes the concatenated
outputs, which are ordered by expert, as if they were ordered by token (so its pairs are not a token's own experts;
here they are), and calibrates the orthogonality weight on the router's weight rows instead of expert outputs
(here: on the first step's outputs).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6  # the authors' normaliser: v / (|v| + eps)
ORTHOGONALITY_TARGET = 1e-4
VARIANCE_TARGET = 1e-2


def orthogonality_loss(y_TKD: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean over tokens and k of the squared projection of each routed expert's output onto the span of the
    token's other routed experts' outputs (Gram-Schmidt basis, in top-k order). 0 for k = 1."""
    t, k, _ = y_TKD.shape
    if k < 2:
        return y_TKD.new_zeros(())
    total = y_TKD.new_zeros(())
    for i in range(k):
        others_TJD = torch.cat([y_TKD[:, :i], y_TKD[:, i + 1:]], dim=1)
        basis: list[torch.Tensor] = []  # orthonormal (to eps) basis of the others, [T, D] each
        for j in range(k - 1):
            v_TD = others_TJD[:, j]
            for u_TD in basis:
                v_TD = v_TD - (u_TD * v_TD).sum(-1, keepdim=True) * u_TD
            basis.append(v_TD / (v_TD.norm(dim=-1, keepdim=True) + eps))
        x_TD = y_TKD[:, i]
        for u_TD in basis:  # |(u . x) u|^2, summed over the basis and the tokens
            total = total + (((u_TD * x_TD).sum(-1, keepdim=True) * u_TD) ** 2).sum()
    return total / (k * t)


def variance_loss(p_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the (unbiased) variance of the token's routing probabilities over the experts."""
    return torch.var(p_TE, dim=-1).mean()


def calibrated_weight(value: float, target: float) -> float:
    """The power of ten that brings a loss term of `value` nearest to `target` (the authors' first-step rule);
    0 when the target or the value is 0."""
    if target == 0 or value == 0 or not math.isfinite(value):
        return 0.0
    return 10.0 ** round(math.log10(target / value))


class SpecialisationLosses:
    """Guo et al.'s two terms on a transformers MoE model, for any training loop:

        terms = SpecialisationLosses(model, orthogonality=1e-4, variance=1e-2)   # the authors' targets
        for batch in batches:
            out = model(**batch)
            loss = out.loss + terms.loss()       # w_o * L_o - w_v * L_v over the MoE layers of this forward
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        terms.remove()

    Hooks on each MoE block's router record, in training forwards, the layer's input, the router's logits and
    the experts each token was sent to; `loss()` recomputes each token's routed experts' outputs from the
    block's canonical weights (`MoEBlock.gate_EFD`, ...; gradients reach the experts through them) and sums
    the terms over the layers, as the authors add one per MoE layer. The variance term reads the softmax of
    the logits (the authors' softmax router; for a sigmoid router it is the same function of its logits).
    The weights are fixed at the first `loss()` (`calibrated_weight`, from that step's layer means) and are
    part of `state_dict()`, so a resumed run keeps them. The recomputation costs about one more pass of the
    routed experts: the authors' own code takes the outputs from the MoE forward it runs anyway."""

    def __init__(self, model, orthogonality: float = ORTHOGONALITY_TARGET, variance: float = VARIANCE_TARGET):
        from sdmoe.moe import find_moe_blocks

        self.targets = {"orthogonality": float(orthogonality), "variance": float(variance)}
        self.weights: dict[str, float] | None = None
        self.blocks = find_moe_blocks(model)
        for block in self.blocks:
            _check_plain_gated(block)
        self._inputs: dict[int, torch.Tensor] = {}
        self._records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.router.register_forward_pre_hook(self._keep_input(i)))
            self._handles.append(block.router.register_forward_hook(self._keep_routing(i)))
        self.last: dict[str, float] = {}  # the last loss()'s unweighted terms (means over layers), for the log

    def _keep_input(self, i: int):
        def hook(module, args):
            if torch.is_grad_enabled():
                self._inputs[i] = args[0]
        return hook

    def _keep_routing(self, i: int):
        def hook(module, args, output):
            if torch.is_grad_enabled() and i in self._inputs:
                x = self._inputs.pop(i)
                logits_TE, _, idx_TK = output
                self._records.append((i, x.reshape(-1, x.shape[-1]), logits_TE, idx_TK.reshape(logits_TE.shape[0], -1)))
        return hook

    def loss(self) -> torch.Tensor | None:
        """The weighted terms of the forwards since the last call (None if none ran); their record cleared."""
        if not self._records:
            return None
        ortho, var = [], []
        for i, x_TD, logits_TE, idx_TK in self._records:
            ortho.append(orthogonality_loss(routed_outputs(self.blocks[i], x_TD, idx_TK)))
            var.append(variance_loss(logits_TE.float().softmax(dim=-1)))
        self._records = []
        self.last = {k: float(torch.stack([v.detach() for v in vs]).mean()) for k, vs in (("orthogonality", ortho),
                                                                                      ("variance", var))}
        if self.weights is None:
            self.weights = {k: calibrated_weight(self.last[k], t) for k, t in self.targets.items()}
        return self.weights["orthogonality"] * sum(ortho) - self.weights["variance"] * sum(var)

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict | None) -> None:
        self.weights = (state or {}).get("weights")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._records, self._inputs = [], [], {}


def routed_outputs(block, x_TD: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Each token's routed experts' outputs, [T, K, D] in top-k order, before the routing weights: a gated MLP
    act(x W_gate^T) * (x W_up^T) W_down^T per expert, from the block's canonical weights (differentiable)."""
    gate_EFD, up_EFD, down_EDF = block.gate_EFD(), block.up_EFD(), block.down_EDF()
    act = getattr(block.experts, "act_fn", None) or torch.nn.functional.silu
    t, k = idx_TK.shape
    flat = idx_TK.reshape(-1)
    token = torch.arange(t, device=x_TD.device).repeat_interleave(k)
    rows, outs = [], []
    for e in torch.unique(flat).tolist():
        where = (flat == e).nonzero(as_tuple=True)[0]
        xs_ND = x_TD[token[where]].to(gate_EFD.dtype)
        h_NF = act(xs_ND @ gate_EFD[e].T) * (xs_ND @ up_EFD[e].T)
        rows.append(where)
        outs.append(h_NF @ down_EDF[e].T)
    y = x_TD.new_zeros(t * k, x_TD.shape[-1], dtype=gate_EFD.dtype)
    return y.index_copy(0, torch.cat(rows), torch.cat(outs)).view(t, k, -1)


def _check_plain_gated(block) -> None:
    """The recomputation is a gated MLP without biases: a family whose experts add biases (gpt-oss) or clamp
    their activation is refused rather than given a loss of other outputs than its own."""
    from sdmoe.errors import UserError

    biased = [n for n, _ in block.experts.named_parameters() if "bias" in n]
    if biased or getattr(block.experts, "limit", None) is not None:
        raise UserError(f"the orthogonality loss recomputes each routed expert's output as a gated MLP without "
                        f"biases, and the experts of {block.name} ({type(block.experts).__name__}) "
                        f"{'add biases (' + biased[0] + ')' if biased else 'clamp their activation'}; set "
                        "aux.orthogonality=0 for this model")
