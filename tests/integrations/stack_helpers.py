"""What the stacks' tests share: our own loop (the reference the stacks' wiring must match) and the split's
invariants, read through the storage adapter."""

import copy

import torch

from sdmoe.method import SDMoE

LR, WD, MAX_NORM = 3e-3, 0.1, 0.05


def tokens(vocab: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(steps)]


def loss_of(model, ids_BT: torch.Tensor) -> torch.Tensor:
    logits_BTV = model(ids_BT)
    return torch.nn.functional.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten())


def own_loop(model, cfg, batches, max_norm: float = MAX_NORM) -> SDMoE:
    """The controller's documented loop (`sdmoe.method.controller`), with torch's AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD, foreach=True)
    ctl = SDMoE(model, cfg)
    for step, ids in enumerate(batches):
        ctl.before_forward(step, opt)
        loss_of(model, ids).backward()
        ctl.after_backward(step)
        ctl.clip_grad_norm_(max_norm)
        opt.step()
        ctl.after_optimizer_step(step)
        opt.zero_grad()
    return ctl


def assert_same_weights(a, b, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def tails_orthogonality(ctl: SDMoE) -> float:
    """max over layers/projections of |T_i U| / |T_i|: the fixed split keeps the tails out of U."""
    worst = 0.0
    for li, layer in enumerate(ctl.layers):
        for p, t in ctl.tails(li).items():
            worst = max(worst, float((t @ layer.basis[p].to(t.dtype)).norm() / t.norm()))
    return worst


def twin(model):
    return copy.deepcopy(model)
