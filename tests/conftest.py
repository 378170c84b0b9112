"""Shared test settings: torch threads from ``NODER_TEST_THREADS`` (default 1: the CI machine has 2 cores, and more
threads than free cores is 10-50x slower). The suite passes with 1 and with 2 threads: no test depends on one
thread count's (or one CPU's) floating-point path."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def torch_threads():
    torch.set_num_threads(int(os.environ.get("NODER_TEST_THREADS", "1")))
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA"))])
def device(request):
    """The devices a device-agnostic test runs on: the CPU, and CUDA when there is one."""
    return torch.device(request.param)
