"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_intra_op_thread():
    """The tests use tiny tensors on a 2-core machine running two pytest workers: one intra-op thread each
    is fastest, and far faster when the machine is loaded (OpenMP threads spin-wait for busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
