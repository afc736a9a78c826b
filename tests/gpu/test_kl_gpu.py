"""The reverse KL's compiled Triton kernels and the fused output layer on a CUDA GPU, at Qwen3's
full vocabulary (151,936 columns). CI has no GPU and deselects these (`-m "not gpu"`); run them on
a cluster node with `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from opsdc_megatron.loss import fused_output_reverse_kl, vocab_parallel_reverse_kl
from opsdc_megatron.loss.reverse_kl import resolve_backend
from tests.workers.kl_worker import BF16_GRAD_RTOL, FP32_RTOL, reference_kl, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.kl,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 151936


def _logits(tokens: int, seed: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(tokens, VOCAB, generator=generator, device="cuda")).to(dtype)


def _value_and_grad(student: torch.Tensor, teacher: torch.Tensor, backend: str, weight: torch.Tensor):
    leaf = student.clone().requires_grad_(True)
    kl = vocab_parallel_reverse_kl(leaf, teacher, backend=backend)
    (kl * weight).sum().backward()
    return kl.detach(), leaf.grad


def test_auto_backend_is_triton_on_cuda() -> None:
    logits = torch.zeros(2, 8, device="cuda")
    assert resolve_backend("auto", logits, logits) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_float64_reference(dtype: torch.dtype) -> None:
    """Within 1e-5 of float64 for the values (the issue asks 1e-3 for bf16 inputs); the gradient
    within its dtype's rounding. Vocabulary padding in the last 64 columns, one masked token."""
    student, teacher = _logits(48, 0, dtype), _logits(48, 1, dtype)
    student[:, -64:], teacher[:, -64:] = float("-inf"), float("-inf")
    weight = torch.rand(48, device="cuda")
    weight[7] = 0.0
    kl, grad = _value_and_grad(student, teacher, "triton", weight)
    ref_kl, ref_grad = reference_kl(student[:, :-64].cpu(), teacher[:, :-64].cpu(), "reverse", weight.cpu())
    assert rel_err(kl.cpu(), ref_kl) <= FP32_RTOL
    assert rel_err(grad[:, :-64].cpu(), ref_grad) <= (FP32_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL)
    assert (grad[:, -64:] == 0).all() and (grad[7] == 0).all()


def test_triton_matches_torch_backend_at_magnitude_1e4() -> None:
    student = 1e4 + _logits(16, 2, torch.float32)
    teacher = -1e4 + _logits(16, 3, torch.float32)
    weight = torch.ones(16, device="cuda")
    kl_triton, grad_triton = _value_and_grad(student, teacher, "triton", weight)
    kl_torch, grad_torch = _value_and_grad(student, teacher, "torch", weight)
    assert torch.isfinite(kl_triton).all() and (kl_triton >= 0).all()
    assert torch.allclose(kl_triton, kl_torch, rtol=1e-5, atol=1e-6)
    assert (grad_triton - grad_torch).abs().max() <= 1e-6


def test_cuda_sums_bf16_products_into_fp32_in_one_addmm() -> None:
    """The fused output layer's weight gradient goes into megatron's fp32 main_grad by torch.addmm with
    out_dtype (torch >= 2.10); older torch takes a slower path with a warning."""
    from opsdc_megatron.loss.fused_output import _cuda_mixed_addmm

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    assert _cuda_mixed_addmm() == ((major, minor) >= (2, 10))


def test_fused_output_layer_as_accurate_as_unfused_in_bf16() -> None:
    """Qwen3-8B's hidden size, bf16 matmuls in 4 token chunks of 64 (groups of 192 and 64), the weight gradient summed in fp32 into a
    megatron DDP ``main_grad`` (CUDA's mixed-dtype addmm): against the float64 KL of the same bf16 hidden
    states and weights, the fused path's value and gradients are as close as the unfused path's (matmul
    rounding differs with the chunk shapes, so the two are compared with the exact result rather than with
    each other)."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    tokens, hidden_size = 256, 4096
    student_hidden = torch.randn(tokens, hidden_size, device="cuda", generator=generator).bfloat16()
    teacher_hidden = torch.randn(tokens, hidden_size, device="cuda", generator=generator).bfloat16()
    weight = (0.02 * torch.randn(VOCAB, hidden_size, device="cuda", generator=generator)).bfloat16()
    teacher_weight = (weight.float() + 0.01 * torch.randn(VOCAB, hidden_size, device="cuda", generator=generator)).bfloat16()

    ref_kl, ref_grad_logits = reference_kl(student_hidden.double() @ weight.double().t(), teacher_hidden.double() @ teacher_weight.double().t(), "reverse")
    ref = (ref_kl, ref_grad_logits @ weight.double(), ref_grad_logits.t() @ student_hidden.double())
    del ref_grad_logits

    h1, w1 = student_hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    unfused = vocab_parallel_reverse_kl(h1 @ w1.t(), teacher_hidden @ teacher_weight.t())
    unfused.sum().backward()
    h2, w2 = student_hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    w2.main_grad = torch.zeros(VOCAB, hidden_size, device="cuda")
    loss, fused = fused_output_reverse_kl(h2, w2, teacher_hidden, teacher_weight, torch.ones(tokens, device="cuda"), chunk_bytes=4 * 64 * VOCAB * 2)
    loss.backward()
    assert w2.grad is None
    for name, got_fused, got_unfused, want in zip(("kl", "hidden grad", "weight grad"), (fused, h2.grad, w2.main_grad), (unfused, h1.grad, w1.grad), ref):
        fused_err, unfused_err = rel_err(got_fused, want), rel_err(got_unfused, want)
        print(f"{name}: fused {fused_err:.3e} unfused {unfused_err:.3e} (relative to max |float64|)")
        assert fused_err <= 1.5 * unfused_err + 1e-6, (name, fused_err, unfused_err)
