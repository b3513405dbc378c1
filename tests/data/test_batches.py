import numpy as np
import pytest
import torch

from sdmoe.data.batches import TokenBatches, eval_batches
from sdmoe.errors import UserError


def _streams():
    rng = np.random.default_rng(0)
    # Token values encode the domain (0xxx, 1xxx, 2xxx) so rows can be checked.
    return {
        "a": (rng.integers(0, 1000, 30_000)).astype(np.uint16),
        "b": (1000 + rng.integers(0, 1000, 10_000)).astype(np.uint16),
        "c": (2000 + rng.integers(0, 1000, 2_000)).astype(np.uint16),
    }


def test_reproducible_by_seed_and_step():
    tb = TokenBatches(_streams(), seq_len=16, batch_size=8, seed=3)
    x5, d5 = tb.sample(5)
    assert x5.shape == (8, 16) and x5.dtype == torch.int64
    assert d5.shape == (8,) and d5.dtype == torch.int64
    tb.sample(0), tb.sample(7)  # drawing other steps in between changes nothing
    again = TokenBatches(_streams(), seq_len=16, batch_size=8, seed=3).sample(5)
    assert torch.equal(again[0], x5) and torch.equal(again[1], d5)
    assert not torch.equal(tb.sample(6)[0], x5)
    assert not torch.equal(TokenBatches(_streams(), 16, 8, seed=4).sample(5)[0], x5)
    # Each row comes from its labelled domain, as a contiguous window of it.
    streams = _streams()
    for row, d in zip(x5, d5):
        assert (row // 1000 == d).all()
        s = streams[tb.domains[d]]
        start = np.flatnonzero(s[: len(s) - 15] == row[0].item())
        assert any(np.array_equal(s[i : i + 16], row.numpy()) for i in start)


def test_iteration_and_resume():
    tb = TokenBatches(_streams(), 8, 4, seed=1)
    run = [next(tb)[0] for _ in range(5)]
    state = tb.state_dict()
    assert state == {"seed": 1, "step": 5}
    resumed = TokenBatches(_streams(), 8, 4, seed=99)
    resumed.load_state_dict({"seed": 1, "step": 3})
    assert torch.equal(next(resumed)[0], run[3]) and torch.equal(next(resumed)[0], run[4])


def test_domain_weights():
    prop = TokenBatches(_streams(), 8, 4000, seed=0).sample(0)[1]
    uni = TokenBatches(_streams(), 8, 4000, seed=0, domain_weights="uniform").sample(0)[1]
    frac_prop = np.bincount(prop.numpy(), minlength=3) / 4000
    frac_uni = np.bincount(uni.numpy(), minlength=3) / 4000
    assert np.allclose(frac_prop, [30 / 42, 10 / 42, 2 / 42], atol=0.03)
    assert np.allclose(frac_uni, [1 / 3] * 3, atol=0.03)


def test_bad_arguments():
    with pytest.raises(UserError, match="seq_len"):
        TokenBatches(_streams(), 1, 4)
    with pytest.raises(UserError, match="batch_size"):
        TokenBatches(_streams(), 8, 0)
    with pytest.raises(UserError, match="domain_weights"):
        TokenBatches(_streams(), 8, 4, domain_weights="equal")
    with pytest.raises(UserError, match="'c' has 2000 training tokens"):
        TokenBatches(_streams(), 4096, 4)


def test_eval_batches_fixed_and_non_overlapping():
    tokens = np.arange(1000, dtype=np.uint16)
    a = eval_batches(tokens, seq_len=10, batch_size=4, max_batches=3)
    b = eval_batches(tokens, seq_len=10, batch_size=4, max_batches=3)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.shape == (4, 10) and x.dtype == torch.int64 for x in a)
    assert torch.equal(torch.cat(a).flatten(), torch.arange(120))  # windows tile the start
    short = eval_batches(tokens[:55], seq_len=10, batch_size=4, max_batches=3)
    assert [x.shape[0] for x in short] == [4, 1]
    assert eval_batches(tokens[:5], seq_len=10, batch_size=4, max_batches=3) == []
