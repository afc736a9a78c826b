"""The output layer fused into the reverse KL (loss/fused_output.py) against the unfused path:
logits materialized by a matmul, then ``vocab_parallel_reverse_kl``. TP=2 runs in
tests/workers/kl_worker.py (tests/test_kl.py::test_tensor_parallel_2_matches_reference)."""

from __future__ import annotations

import pytest
import torch

from opsdc_megatron.loss import fused_output_reverse_kl, vocab_parallel_reverse_kl
from tests.workers.kl_worker import FP32_RTOL, reference_kl, rel_err

pytestmark = pytest.mark.kl

N_TOKENS, HIDDEN, VOCAB = 37, 16, 53
PADDING = slice(48, 53)  # the last 5 columns are vocabulary padding


def _case(seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N_TOKENS, HIDDEN, generator=generator)
    teacher_hidden = torch.randn(N_TOKENS, HIDDEN, generator=generator)
    student_weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    teacher_weight = student_weight + 0.3 * torch.randn(VOCAB, HIDDEN, generator=generator)
    weight = torch.rand(N_TOKENS, generator=generator)
    weight[5] = 0.0  # a masked token
    return [t.to(dtype) for t in (student_hidden, student_weight, teacher_hidden, teacher_weight)], weight


def _unfused(student_hidden, student_weight, teacher_hidden, teacher_weight, weight):
    hidden, out_weight = student_hidden.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)
    student, teacher = hidden @ out_weight.t(), teacher_hidden @ teacher_weight.t()
    student = student.index_fill(1, torch.arange(PADDING.start, PADDING.stop), float("-inf"))
    teacher = teacher.index_fill(1, torch.arange(PADDING.start, PADDING.stop), float("-inf"))
    kl = vocab_parallel_reverse_kl(student, teacher)
    (kl * weight).sum().backward()
    return kl.detach(), hidden.grad, out_weight.grad


def _fused(student_hidden, student_weight, teacher_hidden, teacher_weight, weight, **kwargs):
    hidden, out_weight = student_hidden.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)
    teacher_hidden, teacher_weight = teacher_hidden.clone().requires_grad_(True), teacher_weight.clone().requires_grad_(True)
    loss, kl = fused_output_reverse_kl(hidden, out_weight, teacher_hidden, teacher_weight, weight, vocab_padding=PADDING, **kwargs)
    assert not kl.requires_grad and rel_err(loss.detach(), (kl * weight).sum().double()) <= FP32_RTOL
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    return kl, hidden.grad, out_weight.grad


def _rows_bytes(rows: int, element_bytes: int = 4) -> int:
    """The chunk_bytes that holds the logits of `rows` tokens of one model: chunks of rows // 4 tokens."""
    return rows * VOCAB * element_bytes


@pytest.mark.parametrize("held_rows", [None, 2, 4, 40, 4 * N_TOKENS])
def test_fused_matches_unfused_fp32(held_rows: int | None) -> None:
    """Chunks and groups of 1 and 1, 1 and 3 (the last group partial), 8 and 32 (10 rounded down to whole
    multiples of 8; the last chunk and group partial) and all tokens: values and both gradients within 1e-5."""
    tensors, weight = _case(0)
    want = _unfused(*tensors, weight)
    got = _fused(*tensors, weight, chunk_bytes=None if held_rows is None else _rows_bytes(held_rows))
    for name, g, w in zip(("kl", "hidden grad", "weight grad"), got, want):
        assert rel_err(g, w.double()) <= FP32_RTOL, name
    assert (got[1][5] == 0).all(), "a masked token's hidden state gets no gradient"


def test_default_chunks_hold_an_eighth_of_the_logits_but_at_least_256_aligned_tokens() -> None:
    """Qwen3's vocabulary, bf16: chunks of T/32 tokens in groups of three at T = 8192 and 16384 (a group's student
    logits and a chunk's teacher logits: 1/8 of the logits), chunks of 256 below (each chunk re-reads the whole
    output weight) in groups of what the budget leaves, at least one, all tokens when fewer; an explicit budget
    gives chunks of a quarter of its rows, rounded down to multiples of 64 (8 below 64)."""
    from opsdc_megatron.loss.fused_output import Chunking, chunking

    assert [chunking(tokens, 151936, 2, None) for tokens in (16384, 8192, 5000, 1000, 100)] == [
        (512, 1536), (256, 768), (256, 256), (256, 256), (100, 100)]
    assert chunking(8192, 151936, 2, 4 * 100 * 151936 * 2) == Chunking(64, 5 * 64)  # whole chunks: 400 - 64 rows hold 5
    assert chunking(8192, 151936, 2, 4 * 12 * 151936 * 2) == Chunking(8, 40)


def test_upstream_gradient_scales_both_gradients() -> None:
    """The gradients are computed in forward for an upstream gradient of 1 and scaled in backward."""
    tensors, weight = _case(6)
    _, want_hidden, want_weight = _fused(*tensors, weight)
    hidden, out_weight = tensors[0].clone().requires_grad_(True), tensors[1].clone().requires_grad_(True)
    (-2.5 * fused_output_reverse_kl(hidden, out_weight, tensors[2], tensors[3], weight, vocab_padding=PADDING).loss).backward()
    assert torch.allclose(hidden.grad, -2.5 * want_hidden) and torch.allclose(out_weight.grad, -2.5 * want_weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_goes_into_main_grad(dtype: torch.dtype) -> None:
    """A weight with megatron DDP's fp32 ``main_grad``: the gradient is added there in forward (two
    calls accumulate, bf16 products summed in fp32) and ``.grad`` stays empty; the hidden-state
    gradient arrives as usual. An upstream gradient other than 1 is refused, not silently wrong."""
    tensors, weight = _case(7, dtype)
    _, want_hidden, want_weight = _fused(*tensors, weight)  # .grad: the fp32 sum rounded to the weight's dtype
    hidden, out_weight = tensors[0].clone().requires_grad_(True), tensors[1].clone().requires_grad_(True)
    out_weight.main_grad = torch.zeros(out_weight.shape)
    for _ in range(2):
        fused_output_reverse_kl(hidden, out_weight, tensors[2], tensors[3], weight, vocab_padding=PADDING).loss.backward()
    tolerance = FP32_RTOL if dtype == torch.float32 else 2.0**-8
    assert out_weight.grad is None and rel_err(out_weight.main_grad, 2 * want_weight.double()) <= tolerance
    assert torch.equal(hidden.grad, 2 * want_hidden)
    with pytest.raises(RuntimeError, match="main_grad in forward, for an upstream gradient of 1, but backward got 0.5"):
        (0.5 * fused_output_reverse_kl(hidden, out_weight, tensors[2], tensors[3], weight).loss).backward()


def test_fused_matches_float64_reference() -> None:
    """Through the logits' float64 reverse KL: the fused value and hidden-state gradient."""
    tensors, weight = _case(1)
    student_hidden, student_weight, teacher_hidden, teacher_weight = tensors
    real = slice(0, PADDING.start)
    logits = student_hidden.double() @ student_weight.double().t()
    ref_kl, ref_grad_logits = reference_kl(logits[:, real], (teacher_hidden.double() @ teacher_weight.double().t())[:, real], "reverse", weight)
    ref_grad_hidden = ref_grad_logits @ student_weight.double()[real]
    kl, grad_hidden, grad_weight = _fused(*tensors, weight, chunk_bytes=_rows_bytes(7))
    assert rel_err(kl, ref_kl) <= FP32_RTOL and rel_err(grad_hidden, ref_grad_hidden) <= FP32_RTOL
    assert rel_err(grad_weight[real], ref_grad_logits.t() @ student_hidden.double()) <= FP32_RTOL
    assert (grad_weight[PADDING] == 0).all()


def test_float64_is_float64_throughout() -> None:
    """fp64 inputs (finite-difference checks): the hidden-state gradient is accumulated in fp64 too."""
    tensors, weight = _case(4, torch.float64)
    student_hidden, student_weight, teacher_hidden, teacher_weight = tensors
    real = slice(0, PADDING.start)
    ref_kl, ref_grad_logits = reference_kl((student_hidden @ student_weight.t())[:, real], (teacher_hidden @ teacher_weight.t())[:, real], "reverse", weight)
    kl, grad_hidden, grad_weight = _fused(*tensors, weight, chunk_bytes=_rows_bytes(7, 8))
    assert grad_hidden.dtype == torch.float64 and rel_err(grad_hidden, ref_grad_logits @ student_weight[real]) <= 1e-12
    assert rel_err(kl, ref_kl) <= 1e-12 and rel_err(grad_weight[real], ref_grad_logits.t() @ student_hidden) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend: str) -> None:
    (student_hidden, student_weight, teacher_hidden, teacher_weight), _ = _case(5)
    hidden = student_hidden[:0].clone().requires_grad_(True)
    out_weight = student_weight.clone().requires_grad_(True)
    loss, kl = fused_output_reverse_kl(hidden, out_weight, teacher_hidden[:0], teacher_weight, torch.ones(0), backend=backend)
    loss.backward()
    assert loss == 0 and kl.shape == (0,) and hidden.grad.shape == (0, HIDDEN) and (out_weight.grad == 0).all()


def test_bf16_runs_in_bf16_matmuls_with_fp32_statistics() -> None:
    tensors, weight = _case(2, torch.bfloat16)
    kl, grad_hidden, grad_weight = _fused(*tensors, weight)
    want_kl, want_hidden, want_weight = _unfused(*tensors, weight)
    assert kl.dtype == torch.float32 and grad_hidden.dtype == torch.bfloat16 and grad_weight.dtype == torch.bfloat16
    assert torch.equal(kl, want_kl)  # same bf16 logits, same statistics
    assert rel_err(grad_hidden, want_hidden.double()) <= 2.0**-7 and rel_err(grad_weight, want_weight.double()) <= 2.0**-7


def test_no_grad_call_computes_no_gradient_and_bad_shapes() -> None:
    (student_hidden, student_weight, teacher_hidden, teacher_weight), weight = _case(3)
    student_weight.requires_grad_(True)
    student_weight.main_grad = torch.zeros(student_weight.shape)
    with torch.no_grad():
        loss, kl = fused_output_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, weight)
    assert not loss.requires_grad and kl.shape == (N_TOKENS,) and (student_weight.main_grad == 0).all()
    with pytest.raises(ValueError, match="hidden states must be"):
        fused_output_reverse_kl(student_hidden[:3], student_weight, teacher_hidden, teacher_weight, weight)
    with pytest.raises(ValueError, match="output weights must be"):
        fused_output_reverse_kl(student_hidden, student_weight[:, :4], teacher_hidden, teacher_weight, weight)
    with pytest.raises(ValueError, match=r"token_weights must be \[N=37\], got \(36,\)"):
        fused_output_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, weight[1:])
