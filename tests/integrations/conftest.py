import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sdmoe.data.tokenizer import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog; a small model learns small things. " * 40
    return train_tokenizer([text], 260)
