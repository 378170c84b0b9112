"""Shared test settings: one torch thread (the CI machine has 2 cores; more threads than free cores is 10-50x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA"))])
def device(request):
    """The devices a device-agnostic test runs on: the CPU, and CUDA when there is one."""
    return torch.device(request.param)
