import pytest

from .method_helpers import ALL_MODELS


@pytest.fixture(params=ALL_MODELS)
def kind(request):
    return request.param


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is faster and immune to oversubscribed cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
