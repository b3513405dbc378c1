"""What folding SD-MoE into the optimizer step would save: a measured design alternative, not shipped.

    .venv/bin/python benchmarks/bench_folded.py                  # the small preset (the spec's lab model)
    .venv/bin/python benchmarks/bench_folded.py --preset demo

sdmoe's engine keeps W = S + T_i as a parametrization (`sdmoe.method.parametrization`):
every forward materialises W, autograd hands S the sum of the experts' gradients and
T_i their own, and `SDMoE.after_backward` splits those. The "folded" engine is the
alternative the `<= 1.03` step-time target of issue #7 leaves open. It keeps W as the
model's own parameter and S only as its AdamW moments:

- after the backward, each expert gradient G_i is split in place into its tail part
  G_i (I - QQ^T), and a zero "shared delta" parameter gets sum_i G_i QQ^T;
- AdamW (decay on W, none on the delta) updates both, then the delta is added to
  every expert's W and reset to zero.

With equal learning-rate multipliers this is the default method exactly:
W_i' = (1 - lr wd) W_i - lr (adam(S) + adam(T_i)) on both engines. The script
checks that first, training the folded and the shipped engines side by side from
the same start, and stops if their losses part. It then times, interleaved in one
process as `bench_method.py` does: the plain MoE, the folded engine with the
shipped per-layer split, the folded engine with one split batched across all
layers (every gradient copied into one buffer and back: a few large kernels instead
of ~25 small ones a layer), and the shipped engine.

It needs the fused qwen3_moe experts of the presets (gate_up_proj E x 2F x D,
down_proj E x D x F) and the default config; it is a measurement, not an engine.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_method import Side, forward_backward, interleave, median_ms, paired, shapes, variant_config
from torch import nn

from sdmoe.method import kernels
from sdmoe.moe import find_moe_blocks
from sdmoe.train.config import PRESETS


class FoldedSide(Side):
    """The default SD-MoE (shared/full, per-step split) with W left in the model; Q starts as `twin`'s."""

    def __init__(self, s: dict, twin: Side, lr: float, batched: bool):
        super().__init__(s, None, lr)
        self.f, self.batched = s["f"], batched
        experts = [b.experts for b in find_moe_blocks(self.model)]
        self.weights = [(ex.gate_up_proj, ex.down_proj) for ex in experts]
        self.r = twin.ctl.states[0].r
        # per layer: Q of (gate, up) as 2 x D x r, then of down as 1 x D x r (the order of _canonical())
        self.q = [q for st in twin.ctl.states
                  for q in (torch.stack([st.q("gate"), st.q("up")]).clone(), st.q("down").unsqueeze(0).clone())]
        # per layer: (gate, up)'s delta canonical (2 x F x D), down's in its storage layout (D x F), so that
        # folding it into the experts is a contiguous broadcast (9 against 78 us a layer, lab model)
        self.deltas = [nn.Parameter(torch.zeros(shape)) for _ in experts
                       for shape in ((2, self.f, s["d"]), (s["d"], self.f))]
        self.opt.add_param_group({"params": self.deltas, "weight_decay": 0.0})
        self.q_all = torch.cat(self.q)  # (3 L) x D x r, for the batched split
        # the batched split's gradient buffer, kept across steps: a fresh 0.8-6 MiB one would page-fault every step
        self.buf = torch.empty(3 * len(experts), s["experts"], self.f, s["d"]) if batched else None

    def _canonical(self) -> list[torch.Tensor]:
        """Per layer: the (gate, up) gradients as 2 x E x F x D and down's as 1 x E x F x D (views)."""
        out = []
        for gu, dn in self.weights:
            e = gu.shape[0]
            out += [gu.grad.view(e, 2, self.f, -1).transpose(0, 1), dn.grad.transpose(-1, -2).unsqueeze(0)]
        return out

    @torch.no_grad()
    def split(self) -> None:
        """The shipped kernels, layer by layer, on the model's own gradients."""
        weights = [w for pair in self.weights for w in pair]
        for g_PEFD, q, delta, w in zip(self._canonical(), self.q, self.deltas, weights):
            g_EPFD = g_PEFD.transpose(0, 1)
            q_top = kernels.track(g_EPFD, q, 1, self.r, False)
            delta.grad = w.grad.sum(0).view(delta.shape)  # sum_i G_i, in the delta's layout
            kernels.project_out(g_EPFD, q_top)
            kernels.keep_inside(_canonical_delta(delta.grad), q_top)

    @torch.no_grad()
    def split_batched(self) -> None:
        """One split for all layers and projections: gradients copied into one (3 L) x E x F x D buffer and back."""
        views = self._canonical()
        buf, q = self.buf, self.q_all
        torch.cat(views, 0, out=buf)
        n, e, f, d = buf.shape
        flat = buf.view(n * e, f, d)

        def each_expert(q_NDR):  # Q_p repeated for the experts of p: bmm takes no broadcast batch dim
            return q_NDR.unsqueeze(1).expand(n, e, d, self.r).reshape(n * e, d, self.r)

        m_q = torch.bmm(flat.transpose(-1, -2), torch.bmm(flat, each_expert(q))).view(n, e, d, self.r).sum(1)
        with kernels._one_cpu_thread(m_q):
            q.copy_(torch.linalg.qr(m_q.add_(q, alpha=kernels._SHIFT))[0])
        q_rep = each_expert(q)
        shared = torch.bmm(torch.bmm(buf.sum(1), q), q.transpose(-1, -2))  # (3 L) x F x D
        flat.baddbmm_(torch.bmm(flat, q_rep), q_rep.transpose(-1, -2), alpha=-1.0)
        torch._foreach_copy_(views, list(buf.split([v.shape[0] for v in views])))
        for delta, g in zip(self.deltas, shared.split([2, 1] * len(self.weights))):
            delta.grad = g if delta.ndim == 3 else g[0].T

    @torch.no_grad()
    def fold(self) -> None:
        """W_i += the shared delta AdamW just took; the delta starts the next step at zero."""
        for (gu, dn), d_gu, d_dn in zip(self.weights, self.deltas[0::2], self.deltas[1::2]):
            gu.view(gu.shape[0], 2, self.f, -1).add_(d_gu)
            dn.add_(d_dn)
            d_gu.zero_()
            d_dn.zero_()

    def step(self) -> dict[str, float]:
        ids = self.batches[self.n % len(self.batches)]
        c0, t0 = time.process_time(), time.perf_counter()
        self.last_loss = forward_backward(self.model, ids)
        t1 = time.perf_counter()
        self.split_batched() if self.batched else self.split()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.deltas], 1.0)
        self.opt.step()
        t3 = time.perf_counter()
        self.fold()
        self.opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        self.n += 1
        return {"fwd_bwd": t1 - t0, "split": t2 - t1, "clip_step": t3 - t2, "after_step": t4 - t3,
                "cpu": time.process_time() - c0, "total": t4 - t0}


def _canonical_delta(g: torch.Tensor) -> torch.Tensor:
    """A delta's gradient as P x F x D: (gate, up)'s is already, down's (D x F) is transposed."""
    return g if g.ndim == 3 else g.T.unsqueeze(0)


def check_same_training(s: dict, lr: float, steps: int, batched: bool) -> tuple[float, float]:
    """Train the shipped and the folded engine side by side from the same start.

    Returns the largest relative gap of their losses, and the relative gap of the expert
    weights after the last step (folded W against the shipped engine's materialised S + T)."""
    shipped = Side(s, variant_config("sd-moe"), lr)
    folded = FoldedSide(s, shipped, lr, batched)
    start = [w.detach().clone() for pair in folded.weights for w in pair]
    loss_gap = 0.0
    for _ in range(steps):
        shipped.step()
        folded.step()
        loss_gap = max(loss_gap, abs(float(folded.last_loss) / float(shipped.last_loss) - 1))
    ex = [b.experts for b in find_moe_blocks(shipped.model)]
    with torch.no_grad():
        ours = [w for pair in folded.weights for w in pair]
        theirs = [w for e in ex for w in (e.gate_up_proj, e.down_proj)]
        # measured against how far training moved the weights, so a dropped update shows at full size
        moved = sum((t - w0).square().sum() for t, w0 in zip(theirs, start)).sqrt()
        weight_gap = float(sum((o - t).square().sum() for o, t in zip(ours, theirs)).sqrt() / moved)
    return loss_gap, weight_gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help="the train preset whose model and batch are timed (default small, the spec's lab model)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per side (default 30 for small, 90 otherwise)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = shapes(args.preset)
    if s["style"] != "qwen3_moe":
        ap.error(f"the folded prototype handles qwen3_moe's fused experts; preset {args.preset} is {s['style']}")
    steps = args.steps or (30 if args.preset == "small" else 90)
    for batched in (False, True):
        loss_gap, weight_gap = check_same_training(s, args.lr, 8, batched)
        print(f"folded{' batched' if batched else ''} against the shipped engine, 8 steps from the same start: "
              f"largest relative loss gap {loss_gap:.1e}, expert weights' gap {weight_gap:.1e} of their change")
        if loss_gap > 1e-5 or weight_gap > 1e-3:
            raise SystemExit("the folded engine does not train like the shipped one; its timings would mean nothing")
    shipped = Side(s, variant_config("sd-moe"), args.lr)
    sides = {"baseline": Side(s, None, args.lr), "folded": FoldedSide(s, shipped, args.lr, False),
             "folded-batched": FoldedSide(s, shipped, args.lr, True), "sd-moe": shipped}
    print(f"shapes: {s}; threads {args.threads}; warm-up {args.warmup}, timed {steps} steps per side, interleaved")
    times = interleave(sides, args.warmup, steps)
    for n, med in median_ms(times).items():
        print(f"{n:15s} step / baseline (median of paired ratios) {paired(times, 'baseline', n):.3f}; median ms: " +
              ", ".join(f"{ph} {ms:.2f}" for ph, ms in med.items()))


if __name__ == "__main__":
    main()
