"""Packed (thd) micro-batches give the padded ones' per-token losses, gradients and weights, with the
sdpa attention backend, at TP2 (also sequence-parallel), TP1 x DP2, PP2 (1F1B) and PP2 interleaved: one 2-process launch
(tests/workers/packing_worker.py). The Transformer Engine backend: tests/gpu/test_packing_gpu.py."""

import pytest
import torch

from tests.launch import torchrun

pytestmark = pytest.mark.parallel

TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("packing")
    torchrun("packing_worker.py", 2, str(out))
    return out


def assert_same_steps(padded: dict, packed: dict) -> None:
    assert packed["losses"] == pytest.approx(padded["losses"], rel=TOL, abs=0)
    assert packed["grad_norms"] == pytest.approx(padded["grad_norms"], rel=TOL, abs=0)
    assert padded["weights"].keys() == packed["weights"].keys()
    worst = max((packed["weights"][k] - padded["weights"][k]).abs().max().item() for k in padded["weights"])
    assert worst <= TOL, f"weights differ by up to {worst:.2e}"


@pytest.mark.parametrize("layout", ["tp2", "tp1_dp2"])
def test_packed_per_token_losses_equal_padded(runs, layout):
    results = torch.load(runs / f"{layout}.pt")
    padded, packed = results["padded"]["per_token"], results["packed"]["per_token"]
    assert packed.shape == padded.shape and padded.numel() > 0
    # Absolute: a divergence of ~1e-2 is a difference of log-probabilities of order 1, so fp32 rounding
    # (other matmul shapes when packed) shows as ~1e-7 absolute, ~1e-5 relative.
    worst = (packed - padded).abs().max().item()
    print(f"{layout}: per-token reverse KL up to {padded.max().item():.2e}, packed - padded up to {worst:.1e}")
    assert worst <= TOL / 10
    assert padded.abs().max() > 100 * TOL, "the teacher's instruction makes the divergence non-zero"


@pytest.mark.parametrize("layout", ["tp2", "tp1_dp2", "pp2", "pp2_interleaved"])
def test_packed_optimizer_steps_equal_padded(runs, layout):
    """The token budget groups packed and padded sequences differently (padding counts only when padded):
    the per-token mean over the step does not depend on it. PP2 interleaved: packed micro-batches
    padded to one message shape, and split to a multiple of the pipeline size, against PP2 1F1B padded."""
    results = torch.load(runs / f"{layout}.pt")
    assert results["packed"]["micro_batches"] < results["padded"]["micro_batches"], "without padding more sequences fit"
    if layout == "pp2_interleaved":
        assert results["packed"]["micro_batches"] == 4, "3 packed micro-batches, one split for the pipeline"
    assert_same_steps(results["padded"], results["packed"])


def test_packed_fused_output_layer_equals_padded(runs):
    results = torch.load(runs / "tp2.pt")
    assert_same_steps(results["padded"], results["packed_fused_output_layer"])


@pytest.mark.parametrize("layout", ["packed_sequence_parallel", "packed_fused_output_layer_sequence_parallel"])
def test_sequence_parallel_packed_equals_padded(runs, layout):
    """parallel.sequence_parallel at TP2: each rank embeds, normalizes and adds the residuals of half of
    each packed stream's tokens; the output layer (unfused or fused with the KL) sees them all."""
    results = torch.load(runs / "tp2.pt")
    assert_same_steps(results["padded"], results[layout])


@pytest.mark.parametrize("layout", ["padded_aligned", "packed_aligned"])
def test_streams_padded_to_a_token_multiple_equal_unpadded(runs, layout):
    """Every stream padded to a multiple of 16 tokens (FP8 GEMMs need it; models.transformer_engine.fp8_token_multiple):
    right padding after the sequences, or a padding sequence at the end of a packed row, changes nothing."""
    results = torch.load(runs / "tp2.pt")
    assert_same_steps(results["padded"], results[layout])
