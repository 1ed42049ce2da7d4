"""Shared fixtures. CPU only; importing verl_cppo registers the `cppo` loss with verl's real registry."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The fused kernel's tests (tests/kernels/) run in Triton's CPU interpreter. It must be on before triton is
# first imported (verl imports it), and it only matters where a test asks for cppo.kernel=triton on CPU
# tensors; kernel=auto still picks the torch path on CPU. Run with TRITON_INTERPRET=0 to opt out.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
