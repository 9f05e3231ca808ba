import sys, os; sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (CI has 2 cores; small models run faster on one), then
    restore the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
