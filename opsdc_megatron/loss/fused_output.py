"""The output layer fused with the reverse KL: from final hidden states to per-token KL without
ever holding the ``[T, V/TP]`` logits.

At Qwen3's 151,936-token vocabulary the logits of one micro-batch (student and teacher, plus the
gradient) outweigh the rest of the step's activations. Here this rank's vocabulary shard runs in
chunks of columns: each chunk's student and teacher logits ``[T, columns]`` are one matmul each
with a row block of the output weight, reduced to the local statistics of ``reverse_kl.py`` and
freed; the chunks' statistics are merged like tensor-parallel shards (the same rescaling), then
over the TP group by the usual two collectives. Chunking the vocabulary, not the tokens, keeps
every matmul as tall as the micro-batch (a token chunk would re-read the whole output weight per
chunk) and lets each chunk's weight gradient be written once into its own rows.

Backward recomputes each chunk's logits (two matmuls), turns them into the logits' gradient and at
once into the gradients of the hidden states (accumulated in fp32 over chunks) and of the weight
rows (two matmuls). Extra memory: one chunk's logits and the fp32 ``[T, H]`` accumulator, never the
full logits, for 1.5x the matmuls of an unfused output layer (which runs three for the student
and one for the teacher).

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

from opsdc_megatron.loss.reverse_kl import (
    Backend,
    KLStatistics,
    combine_local_statistics,
    local_statistics,
    merge_statistics,
    resolve_backend,
    reverse_kl_grad_into,
)

__all__ = ["fused_output_reverse_kl"]

_CHUNK_FRACTION = 1 / 8
"""Default budget of the fused path's extra memory: this fraction of one bf16 copy of this rank's
logits, shared by the fp32 hidden-state gradient accumulator and one chunk."""
_COLUMN_ALIGNMENT = 256
"""Chunks are whole multiples of 256 columns: a logits chunk whose row length is not a multiple of
8 elements drops cuBLAS off its tensor-core paths (measured 4x slower on an H200)."""
# Bytes per logit element alive within a chunk: student, teacher and gradient chunks in a 2-byte
# dtype, plus the torch backend's fp32 block temporaries (12 bytes, see reverse_kl.py).
_BYTES_PER_ELEMENT = {"triton": 6, "torch": 18}


def _chunk_columns(n_tokens: int, hidden: int, vocab_shard: int, backend: str, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        accumulator_bytes = n_tokens * hidden * 6  # fp32 [T, H] sum and one bf16 [T, H] product
        chunk_bytes = int(_CHUNK_FRACTION * 2 * n_tokens * vocab_shard) - accumulator_bytes
        columns = chunk_bytes // (max(1, n_tokens) * _BYTES_PER_ELEMENT[backend])
        columns = max(_COLUMN_ALIGNMENT, columns // _COLUMN_ALIGNMENT * _COLUMN_ALIGNMENT)
    else:
        columns = chunk_bytes // (max(1, n_tokens) * _BYTES_PER_ELEMENT[backend])
    return max(1, min(vocab_shard, columns))


def _chunk_logits(hidden: Tensor, weight: Tensor, columns: slice, padding: slice | None) -> Tensor:
    """``hidden @ weight[columns].T`` with the vocabulary-padding columns among them set to -inf."""
    logits = hidden @ weight[columns].t()
    if padding is not None:
        first, last = max(padding.start, columns.start), min(padding.stop, columns.stop)
        if first < last:
            logits[:, first - columns.start : last - columns.start] = float("-inf")
    return logits


def _column_chunks(vocab_shard: int, columns: int) -> list[slice]:
    return [slice(start, min(start + columns, vocab_shard)) for start in range(0, vocab_shard, columns)]


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
        columns: int,
        backend: Literal["torch", "triton"],
    ) -> Tensor:
        chunk_statistics = []
        rows = max(1, student_hidden.shape[0])  # the torch backend's token block: all of them
        for chunk in _column_chunks(student_weight.shape[0], columns):
            student = _chunk_logits(student_hidden, student_weight, chunk, padding)
            teacher = _chunk_logits(teacher_hidden, teacher_weight, chunk, padding)
            chunk_statistics.append(local_statistics(student, teacher, backend, rows))
            del student, teacher
        stats = merge_statistics(combine_local_statistics(torch.stack(chunk_statistics)), group)
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, *stats[1:])
        ctx.padding, ctx.columns, ctx.backend = padding, columns, backend
        return stats.kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        student_hidden, student_weight, teacher_hidden, teacher_weight, *saved = ctx.saved_tensors
        stats = KLStatistics(None, *saved)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulator_dtype = torch.promote_types(torch.float32, student_hidden.dtype)  # fp64 stays fp64
        grad_hidden = torch.zeros(student_hidden.shape, dtype=accumulator_dtype, device=student_hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(student_weight) if want_weight else None
        scale = grad_kl.to(stats.c.dtype).contiguous()  # once, not per chunk (kl.sum() sends a stride-0 one)
        for chunk in _column_chunks(student_weight.shape[0], ctx.columns):
            student = _chunk_logits(student_hidden, student_weight, chunk, ctx.padding)
            teacher = _chunk_logits(teacher_hidden, teacher_weight, chunk, ctx.padding)
            grad_logits = torch.empty_like(student)
            reverse_kl_grad_into(grad_logits, student, teacher, stats, scale, ctx.backend, max(1, student.shape[0]))
            del student, teacher
            if want_hidden:
                grad_hidden += grad_logits @ student_weight[chunk]
            if want_weight:
                torch.mm(grad_logits.t(), student_hidden, out=grad_weight[chunk])
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(student_hidden.dtype)
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
        chunk_bytes: byte budget of one chunk of vocabulary columns (default: what is left of 1/8
            of a bf16 copy of this rank's logits after the [N, H] gradient accumulator, in whole
            multiples of 256 columns). Results do not depend on it beyond rounding.
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
    columns = _chunk_columns(student_hidden.shape[0], student_hidden.shape[1], student_weight.shape[0], resolved, chunk_bytes)
    return _FusedOutputReverseKL.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, tp_group, vocab_padding, columns, resolved
    )
