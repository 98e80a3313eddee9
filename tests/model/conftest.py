import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The model tests run small matmuls on 2 shared cores, where a second OpenMP thread mostly
    spins: one thread measured ~5x faster for the 100-step training test here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
