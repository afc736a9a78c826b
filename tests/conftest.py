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


@pytest.fixture(autouse=True)
def restored_stop_signals():
    """`opsdc train`, `eval` and `demo` run in the test process install record-only handlers for the stop
    signals (train/preemption.py); the next test, and pytest itself (a CI timeout's SIGTERM), get theirs back."""
    import signal

    from opsdc_megatron.train.preemption import STOP_SIGNALS

    saved = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.fixture
def refused_before_start(monkeypatch):
    """For `opsdc train` refusals run in the test process: a refusal that stopped firing fails at once instead
    of training (toy_cpu.yaml: TP=2 through torchrun, 30 steps) inside pytest."""
    from opsdc_megatron import cli
    from opsdc_megatron.train import loop

    def started(*args, **kwargs):
        raise AssertionError("opsdc train was not refused: it started training")

    monkeypatch.setattr(cli, "_start_workers", started)
    monkeypatch.setattr(loop, "run", started)
