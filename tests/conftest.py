import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models run fastest on one thread, and a busy machine cannot oversubscribe it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
