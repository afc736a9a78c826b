"""The output layer fused with the reverse KL: from final hidden states to per-token KL without
ever holding the ``[T, V/TP]`` logits.

At Qwen3's 151,936-token vocabulary the logits of one micro-batch (student and teacher, plus the
gradient) outweigh the rest of the step's activations. Here the tokens run in chunks: each chunk's
student and teacher logits are computed by a matmul with this rank's vocabulary shard of the
output weight, reduced to the per-token statistics of ``reverse_kl.py`` (the same two collectives
per chunk, the same Triton or torch backend) and freed. Backward recomputes each chunk's logits
(two matmuls), turns them into the logits' gradient and immediately into the gradients of the
student's hidden states and output weight (two matmuls); so the extra memory is one chunk's logits,
never the full tensor, for 1.5x the matmuls of an unfused output layer (which runs three for the
student and one for the teacher).

The hidden-state gradient is this rank's partial sum over its vocabulary shard; the caller
all-reduces it over the tensor-parallel group, as megatron's ColumnParallelLinear does (pass the
hidden states through ``copy_to_tensor_model_parallel_region`` first).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

from opsdc_megatron.loss.reverse_kl import Backend, KLStatistics, kl_statistics, resolve_backend, reverse_kl_grad_into

__all__ = ["fused_output_reverse_kl"]

_CHUNK_FRACTION = 1 / 8
"""Default byte budget of one chunk: this fraction of one bf16 copy of the full logits."""
_MIN_CHUNK_BYTES = 16 << 20
# Bytes per logit element alive within a chunk: student, teacher and gradient chunks in a 2-byte
# dtype, plus the torch backend's fp32 block temporaries (13 bytes, see reverse_kl.py).
_BYTES_PER_ELEMENT = {"triton": 6, "torch": 19}


def _chunk_tokens(n_tokens: int, vocab_shard: int, backend: str, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        chunk_bytes = max(_MIN_CHUNK_BYTES, int(_CHUNK_FRACTION * 2 * n_tokens * vocab_shard))
    return max(1, min(n_tokens, chunk_bytes // (max(1, vocab_shard) * _BYTES_PER_ELEMENT[backend])))


def _chunk_logits(hidden: Tensor, weight: Tensor, padding: slice | None) -> Tensor:
    logits = hidden @ weight.t()
    if padding is not None:
        logits[:, padding] = float("-inf")
    return logits


class _FusedOutputReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        group: ProcessGroup | None,
        padding: slice | None,
        rows: int,
        backend: Literal["torch", "triton"],
    ) -> Tensor:
        chunks = []
        with torch.no_grad():
            for start in range(0, student_hidden.shape[0], rows):
                block = slice(start, start + rows)
                student = _chunk_logits(student_hidden[block], student_weight, padding)
                teacher = _chunk_logits(teacher_hidden[block], teacher_weight, padding)
                chunks.append(kl_statistics(student, teacher, group, backend, rows))
                del student, teacher
        stats = KLStatistics(*(torch.cat(parts) for parts in zip(*chunks)))
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, *stats[1:])
        ctx.padding, ctx.rows, ctx.backend = padding, rows, backend
        return stats.kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        student_hidden, student_weight, teacher_hidden, teacher_weight, *saved = ctx.saved_tensors
        stats = KLStatistics(None, *saved)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(student_hidden) if want_hidden else None
        # Accumulated chunk by chunk in the weight's dtype (each chunk's matmul accumulates in fp32).
        grad_weight = torch.zeros_like(student_weight) if want_weight else None
        scale = grad_kl.to(stats.c.dtype)
        rows = ctx.rows
        for start in range(0, student_hidden.shape[0], rows):
            block = slice(start, start + rows)
            student = _chunk_logits(student_hidden[block], student_weight, ctx.padding)
            teacher = _chunk_logits(teacher_hidden[block], teacher_weight, ctx.padding)
            chunk_stats = KLStatistics(None, *(s[block] for s in stats[1:]))
            grad_logits = torch.empty_like(student)
            reverse_kl_grad_into(grad_logits, student, teacher, chunk_stats, scale[block], ctx.backend, rows)
            del student, teacher
            if want_hidden:
                torch.mm(grad_logits, student_weight, out=grad_hidden[block])
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), student_hidden[block])
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_output_reverse_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    tp_group: ProcessGroup | None = None,
    *,
    vocab_padding: slice | None = None,
    chunk_bytes: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Per-token reverse KL(p_student || p_teacher) of ``softmax(hidden @ weight.T)`` over the full,
    TP-sharded vocabulary, computed chunk by chunk.

    Args:
        student_hidden: ``[N, H]`` final hidden states at the response positions (after the final
            norm); receives this rank's partial gradient (all-reduce it over ``tp_group``).
        student_weight: ``[V/TP, H]`` this rank's shard of the output (or tied embedding) weight;
            receives its gradient.
        teacher_hidden, teacher_weight: the teacher's, same shapes; never receive gradients.
        tp_group: the group the vocabulary is split over (``None``: full vocabulary).
        vocab_padding: columns of this rank's shard that are vocabulary padding (set to ``-inf``).
        chunk_bytes: byte budget of one chunk (default: 1/8 of a bf16 copy of the full logits,
            at least 16 MiB). Results do not depend on it beyond rounding.
        backend: as in ``vocab_parallel_reverse_kl``.

    Returns:
        ``[N]`` float32, identical on all ranks; equals ``vocab_parallel_reverse_kl`` of the logits.
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states must be [N, H] and equal in shape, got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape != teacher_weight.shape or student_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(
            f"output weights must be [V/TP, H={student_hidden.shape[1]}] and equal in shape, got "
            f"{tuple(student_weight.shape)} and {tuple(teacher_weight.shape)}"
        )
    resolved = resolve_backend(backend, student_hidden, teacher_hidden)
    rows = _chunk_tokens(student_hidden.shape[0], student_weight.shape[0], resolved, chunk_bytes)
    return _FusedOutputReverseKL.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, tp_group, vocab_padding, rows, resolved
    )
