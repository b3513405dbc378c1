import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is faster and immune to oversubscribed cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sdmoe.data.tokenizer import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog; a small model learns small things. " * 40
    return train_tokenizer([text], 260)
