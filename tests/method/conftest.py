import pytest

from .method_helpers import ALL_MODELS


@pytest.fixture(params=ALL_MODELS)
def kind(request):
    return request.param


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
