"""Test-session set-up that must precede every import of the code under test."""

import os

import pytest
import torch

# Without a GPU, the Triton KL kernels run in Triton's interpreter (tests/test_kl_triton.py). The
# switch must be set before anything imports triton: megatron-core imports it when a test module
# imports megatron, and triton.language's own @jit helpers (tl.max, tl.sum) are then compiled-mode
# functions that the interpreter refuses to call.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_rank():
    """A one-process megatron world (TP = PP = 1) for a module's tests."""
    from opsdc_megatron.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=0)
    yield
    destroy_distributed()
