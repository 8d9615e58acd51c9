"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, then restore the previous count.

    The networks of the trainer tests are tiny: on a loaded two-core machine a second thread
    made their steps several times (up to 20 times) slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
