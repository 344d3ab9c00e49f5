import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny ops on 2 threads spin-wait against any other CPU load (30x slower); one thread is enough."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
