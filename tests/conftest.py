import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One torch thread for a test module of tiny problems (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    no contention between threads on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
