"""Tiny models for the method tests: the six transformers styles plus a hand-built ModuleList MoE."""

from __future__ import annotations

import types

import torch
from torch import nn

from sdmoe.models import STYLES, ModelConfig, build_model

VOCAB = 256
ALL_MODELS = (*STYLES, "module_list")


class _MLP(nn.Module):
    def __init__(self, d, f, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(d, f, bias=False))
        setattr(self, names[1], nn.Linear(d, f, bias=False))
        setattr(self, names[2], nn.Linear(f, d, bias=False))

    def forward(self, x):
        g, u, dn = (getattr(self, n) for n in self.names)
        return dn(nn.functional.silu(g(x)) * u(x))


class ListMoE(nn.Module):
    """A sparse MoE block whose experts are an nn.ModuleList of MLPs (transformers-4 style)."""

    def __init__(self, d, e, f, k, names):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList([_MLP(d, f, names) for _ in range(e)])

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            weight = (w * (idx == i)).sum(-1, keepdim=True)
            out = out + weight * expert(x)
        return out


class _Layer(nn.Module):
    def __init__(self, d, e, f, k, names):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = ListMoE(d, e, f, k, names)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class ListMoEModel(nn.Module):
    def __init__(self, d=32, e=4, f=16, k=2, layers=2, vocab=VOCAB, names=("w1", "w3", "w2")):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Layer(d, e, f, k, names) for _ in range(layers)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids=None, **_):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return types.SimpleNamespace(logits=self.head(x))


def make_model(kind: str, seed: int = 0, d: int = 32, f: int = 16) -> nn.Module:
    if kind == "module_list":
        torch.manual_seed(seed)
        return ListMoEModel(d=d, f=f)
    cfg = ModelConfig(style=kind, hidden_size=d, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                      expert_ffn=f, aux_loss_coef=0.0)
    return build_model(cfg, VOCAB, seed=seed)


def batch(seed: int = 0, b: int = 2, s: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g)


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def train_steps(model, ctl, ids, steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps driven by `ctl` (already split), so weights and bases are a trained model's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ctl.bind_optimizer(opt)
    for step in range(steps):
        model(input_ids=ids).logits.square().mean().backward()
        ctl.after_backward(step)
        opt.step()
        ctl.after_optimizer_step(step)
        opt.zero_grad()


def rel(a, b):
    return float((a - b).norm() / b.norm())
