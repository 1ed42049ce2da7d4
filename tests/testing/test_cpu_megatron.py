"""The CUDA-to-CPU scope of the Megatron CPU platform rewrites what it must inside, and nothing outside.

``verl_cppo.testing.cpu_megatron.cpu_device_scope`` is entered only around five megatron / verl calls and
suspended in verl's code they call back (patches/README.md, `cpu_megatron`). Inside: a "cuda" device becomes the
CPU, ``.cuda()`` keeps the tensor, ``.type()`` gives the ``torch.cuda`` name megatron's optimizer checks for,
``torch.cuda.current_device()`` is "cpu". Outside,
all of that is torch's own behaviour again (this machine has no CUDA: a "cuda" allocation fails), so a device
mistake in verl's data path or the loss still fails.
"""

import pytest
import torch

from verl_cppo.testing import cpu_megatron


def test_inside_the_scope_cuda_calls_run_on_the_cpu():
    with cpu_megatron.cpu_device_scope():
        zeros = torch.zeros(3, device="cuda")
        ones = torch.tensor([1.0], device=torch.device("cuda", 0), pin_memory=True)
        assert zeros.device.type == ones.device.type == "cpu"
        assert zeros.cuda() is zeros and zeros.to("cuda").device.type == "cpu"
        assert zeros.type() == "torch.cuda.FloatTensor" and torch.zeros(1, dtype=torch.bfloat16).type() == (
            "torch.cuda.BFloat16Tensor"
        )
        assert torch.cuda.current_device() == "cpu"
        assert zeros.type(torch.float64).dtype == torch.float64  # a conversion is not a query: untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the scope's exit on a machine without CUDA")
def test_outside_the_scope_torch_is_itself_again():
    with cpu_megatron.cpu_device_scope():
        pass
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    with pytest.raises((RuntimeError, AssertionError)):  # torch's own: no CUDA driver here
        torch.cuda.current_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the scope's exit on a machine without CUDA")
def test_the_scope_is_left_on_an_error():
    with pytest.raises(ValueError, match="inside"):
        with cpu_megatron.cpu_device_scope():
            raise ValueError("inside")
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the suspension on a machine without CUDA")
def test_verl_code_called_back_from_inside_the_scope_runs_unrewritten():
    """megatron's schedule calls verl's batch preparation and loss: the scope is suspended there (a "cuda" device
    fails again), and the model call inside them re-enters it."""
    with cpu_megatron.cpu_device_scope():
        with cpu_megatron.cpu_device_scope(active=False):
            assert torch.zeros(1).type() == "torch.FloatTensor"
            with pytest.raises((RuntimeError, AssertionError)):
                torch.zeros(1, device="cuda")
            with cpu_megatron.cpu_device_scope():
                assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"


def test_every_shim_names_a_distinct_target():
    targets = cpu_megatron.HOOK_TARGETS
    assert len(set(targets)) == len(targets) == 13
    scoped = {f"{m}:{a}" for m, a in (*cpu_megatron.CUDA_SCOPES, *cpu_megatron.CUDA_SUSPENDED)}
    assert scoped <= set(targets)
