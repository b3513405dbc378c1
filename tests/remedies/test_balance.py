"""Global-batch balancing: transformers' balance loss for one micro-batch on one rank, a different one beyond."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from sdmoe.remedies.balance import GlobalBatchBalance

E, K = 8, 2


def _logits(seed, layers=3, tokens=40, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0, skew, E)
    return [torch.randn(tokens, E, generator=g) + bias for _ in range(layers)]


def test_one_micro_batch_on_one_rank_is_transformers_balance_loss():
    logits = _logits(0)
    balance = GlobalBatchBalance(E, K)
    assert balance.loss(logits).item() == pytest.approx(load_balancing_loss_func(tuple(logits), E, K).item(), rel=1e-6)


def test_several_micro_batches_see_the_steps_counts_so_far():
    # two micro-batches routed to opposite ends: each alone looks unbalanced, together they balance
    first, second = _logits(1, skew=4.0), _logits(2, skew=-4.0)
    balance = GlobalBatchBalance(E, K)
    a, b = balance.loss(first), balance.loss(second)
    local_b = load_balancing_loss_func(tuple(second), E, K)
    assert a.item() == pytest.approx(load_balancing_loss_func(tuple(first), E, K).item(), rel=1e-6)
    assert b.item() < 0.8 * local_b.item()  # the global counts are more even than the micro-batch's own
    balance.end_step()  # a new optimizer step: the counts start over
    assert balance.loss(second).item() == pytest.approx(local_b.item(), rel=1e-6)


def test_ranks_share_their_counts_through_reduce():
    first, second = _logits(3, skew=4.0), _logits(4, skew=-4.0)
    mine = GlobalBatchBalance(E, K)
    mine.loss(second)  # what the other rank counts (the same step)
    other_counts = torch.cat([mine.counts_E, mine.rows[None]])
    ranks = GlobalBatchBalance(E, K, reduce=lambda t: t + other_counts)  # an all-reduce over two ranks
    alone = GlobalBatchBalance(E, K)
    assert ranks.loss(first).item() < alone.loss(first).item()  # balanced across ranks, not within this one


def test_the_gradient_reaches_only_the_probabilities():
    logits = [x.requires_grad_() for x in _logits(5)]
    GlobalBatchBalance(E, K).loss(logits).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in logits)
