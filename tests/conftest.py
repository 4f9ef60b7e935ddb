"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The tests' tensors are tiny: one thread is faster and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
