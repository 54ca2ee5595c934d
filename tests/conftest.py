"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The test machines have 2 cores, shared with the workers that multi-process tests spawn:
    intra-op threads make each tiny step many times slower there, so every test runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
