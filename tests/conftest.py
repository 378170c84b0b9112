"""Shared test settings: one torch thread (the CI machine has 2 cores; more threads than free cores is 10-50x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    torch.set_num_threads(1)
    yield
