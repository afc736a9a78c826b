"""The output layer fused with the reverse KL: from final hidden states to the weighted loss without
ever holding the ``[T, V/TP]`` logits, in the output layer's four matmuls.

At Qwen3's 151,936-token vocabulary the logits of one micro-batch (student and teacher, plus the
gradient) outweigh the rest of the step's activations. Here the tokens run in chunks: a chunk's
student and teacher logits ``[rows, V/TP]`` are one matmul each; their statistics are merged over
the TP group (the two collectives of ``reverse_kl.py``) and, because the loss's per-token weights
are known in forward, the chunk's logits gradient is written over its student logits at once. The
gradients of a group of consecutive chunks then become those of their hidden states (one matmul)
and of the output weight (one matmul, accumulated in fp32), and the group is freed. Four matmuls in
all, as an unfused output layer runs (three for the student, one for the teacher); recomputing the
logits in backward would cost six.

The price: every chunk's logits matmul reads the whole output weight shard, and every group's
weight-gradient matmul reads and writes the whole fp32 weight gradient (at Qwen3-8B's shapes on an
H200 that traffic takes longer than the matmul's arithmetic for groups below about 1000 rows), so
the logits held at once are spent mostly on the group: a chunk is a quarter of the budget's rows, and
its teacher logits sit beside the group's student logits and gradients, the budget's remaining whole
chunks (at least one). The default budget, 1/8 of one bf16 logits tensor, gives chunks of 256 rows in
groups of 768 at T = 8192 (chunks of T/32, never fewer than 256 rows); below T = 4096 a group of one
256-row chunk holds more than 1/8 of the logits, at most 148 MiB at Qwen3's vocabulary. Extra memory:
the group's student logits (the gradients overwrite them) and one chunk's teacher logits, plus, with the
torch backend, one chunk's fp32 tile temporaries (reverse_kl.py's default: 0.2x of its bf16 logits), and,
without a mixed-dtype matmul (CPU; CUDA before torch 2.10), the weight gradient's bf16 product in pieces of
one chunk's logits and the fp32 copy the addition makes of each.

Why the gradient exists before backward: the loss is ``sum_i token_weights_i * KL_i`` and its only
unknown in forward is the upstream scalar. The hidden-state gradient is kept (``[N, H]``, the size
of the hidden states) and scaled by it in backward. The weight gradient goes, as megatron's
``gradient_accumulation_fusion`` does, straight into ``weight.main_grad`` when the weight has one
(megatron-core DDP), which needs the upstream scalar to be 1 (it is under megatron's per-token
loss schedules; fp16 loss scaling is not supported here), and is otherwise accumulated in an fp32
buffer of the weight's shape and returned scaled in backward.

The hidden-state gradient is this rank's partial sum over its vocabulary shard; the caller
all-reduces it over the tensor-parallel group, as megatron's ColumnParallelLinear does (pass the
hidden states through ``copy_to_tensor_model_parallel_region`` first).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

from opsdc_megatron.loss.reverse_kl import Backend, compute_dtype, kl_statistics, resolve_backend, reverse_kl_grad_into, tiling

__all__ = ["FusedOutputLoss", "fused_output_reverse_kl"]

_CHUNK_FRACTION = 1 / 8
"""Default budget of the logits held at once: this fraction of one bf16 copy of this rank's logits..."""
_MIN_CHUNK_ROWS = 256
"""...but chunks of at least this many tokens (or all of them): every chunk's logits matmuls re-read the
whole output weight shard, which smaller chunks would repeat for too little matmul work."""
_CHUNKS_PER_BUDGET = 4
"""A chunk is this fraction of the budget's rows; the rest goes to its group: one chunk's teacher logits
beside the group's student logits and gradients (three chunks' by default, more where the chunk was
rounded down to whole multiples of 64 rows)."""
_ROW_ALIGNMENT = 64
"""Chunks are whole multiples of 64 rows (of 8 below 64 rows, when there are that many): the rows are
the inner dimension of the weight-gradient matmul, which leaves the tensor-core paths when it is not a
multiple of 8."""


class Chunking(NamedTuple):
    rows: int
    """Tokens per chunk: its logits matmuls, statistics and logits gradient."""
    group_rows: int
    """Tokens per group of consecutive chunks: its hidden-state and weight gradient matmuls."""


def chunking(n_tokens: int, vocab_shard: int, element_bytes: int, chunk_bytes: int | None) -> Chunking:
    """Chunks and groups whose logits (a group's student logits, one chunk's teacher logits) fit ``chunk_bytes``."""
    budget = int(_CHUNK_FRACTION * 2 * n_tokens * vocab_shard) if chunk_bytes is None else chunk_bytes
    held_rows = budget // (max(1, vocab_shard) * element_bytes)
    rows = max(_MIN_CHUNK_ROWS, held_rows // _CHUNKS_PER_BUDGET) if chunk_bytes is None else held_rows // _CHUNKS_PER_BUDGET
    alignment = _ROW_ALIGNMENT if rows >= _ROW_ALIGNMENT else 8 if rows >= 8 else 1
    rows = max(1, min(n_tokens, rows // alignment * alignment))
    return Chunking(rows, min(max(n_tokens, 1), max(1, (held_rows - rows) // rows) * rows))


class FusedOutputLoss(NamedTuple):
    loss: Tensor
    """0-dim float32: ``sum_i token_weights_i * KL_i`` over the tokens whose weight is not 0."""
    kl: Tensor
    """``[N]`` float32 per-token KL, identical on all ranks; no gradient."""


def _logits(hidden: Tensor, weight: Tensor, padding: slice | None, out: Tensor | None = None) -> Tensor:
    """``hidden @ weight.T`` (into ``out`` when given) with the vocabulary-padding columns set to -inf."""
    logits = torch.mm(hidden, weight.t(), out=out)
    if padding is not None:
        logits[:, padding] = float("-inf")
    return logits


def _slices(stop: int, size: int, start: int = 0) -> list[slice]:
    return [slice(first, min(first + size, stop)) for first in range(start, stop, size)]


def _accumulate_weight_grad(accumulator: Tensor, grad_logits: Tensor, hidden: Tensor, piece_elements: int) -> None:
    """``accumulator += grad_logits.T @ hidden``, the products summed in the accumulator's dtype."""
    if accumulator.dtype == grad_logits.dtype:
        accumulator.addmm_(grad_logits.t(), hidden)
    elif accumulator.is_cuda and _cuda_mixed_addmm():  # bf16 inputs, fp32 sum: one cuBLAS call, as apex's wgrad_gemm_accum_fp32
        torch.addmm(accumulator, grad_logits.t(), hidden, out_dtype=accumulator.dtype, out=accumulator)
    else:  # each group's product rounded to bf16 once, as the bf16 .grad megatron DDP adds into main_grad
        # per micro-batch is, in pieces of at most `piece_elements` (one chunk's logits; the addition
        # makes an fp32 copy of each)
        piece = max(1, piece_elements // hidden.shape[1])
        for start in range(0, accumulator.shape[0], piece):
            accumulator[start : start + piece] += grad_logits[:, start : start + piece].t() @ hidden


@functools.cache
def _cuda_mixed_addmm() -> bool:
    """Whether this torch sums bf16 products into an fp32 ``addmm`` output on CUDA (``out_dtype``,
    accepted with an fp32 input from torch 2.10; older versions raise). Tried once on tiny tensors;
    without it the weight gradient takes one more pass over each chunk's product, with a warning."""
    accumulator = torch.zeros(8, 8, device="cuda")
    factor = torch.ones(8, 8, dtype=torch.bfloat16, device="cuda")
    try:
        torch.addmm(accumulator, factor, factor, out_dtype=torch.float32, out=accumulator)
    except (TypeError, RuntimeError, NotImplementedError) as error:
        warnings.warn(
            f"torch {torch.__version__} has no fp32-output addmm for bf16 inputs on CUDA ({error}); the fused "
            "output layer adds each chunk's bf16 weight gradient into main_grad separately (slower; torch >= 2.10 has it)",
            stacklevel=2,
        )
        return False
    return bool((accumulator == 8).all())


class _FusedOutputReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        token_weights: Tensor,
        tp_group: ProcessGroup | None,
        padding: slice | None,
        chunks: Chunking,
        backend: Literal["torch", "triton"],
        with_grads: bool,
    ) -> tuple[Tensor, Tensor]:
        want_hidden = with_grads and ctx.needs_input_grad[0]
        want_weight = with_grads and ctx.needs_input_grad[1]
        into_main_grad = want_weight and getattr(student_weight, "main_grad", None) is not None
        grad_hidden = torch.empty_like(student_hidden) if want_hidden else None
        if into_main_grad:
            grad_weight = student_weight.main_grad
        elif want_weight:
            grad_weight = torch.zeros(student_weight.shape, dtype=compute_dtype(student_weight), device=student_weight.device)
        dtype = compute_dtype(student_hidden, teacher_hidden)  # of the statistics
        scale, vocab_shard = token_weights.to(dtype), student_weight.shape[0]
        kl = torch.empty(student_hidden.shape[0], dtype=scale.dtype, device=student_hidden.device)
        for group in _slices(student_hidden.shape[0], chunks.group_rows):
            # the group's student logits, each chunk's overwritten by its gradient once its statistics are known
            group_logits = torch.empty(group.stop - group.start, vocab_shard, dtype=student_hidden.dtype, device=student_hidden.device)
            for chunk in _slices(group.stop, chunks.rows, group.start):
                student = _logits(student_hidden[chunk], student_weight, padding, out=group_logits[chunk.start - group.start : chunk.stop - group.start])
                teacher = _logits(teacher_hidden[chunk], teacher_weight, padding)
                tiles = tiling(student.shape[0], vocab_shard, dtype, None)  # the torch backend's fp32 temporaries
                stats = kl_statistics(student, teacher, tp_group, backend, tiles)
                kl[chunk] = stats.kl
                if want_hidden or want_weight:  # each tile read before its gradient is written over it
                    reverse_kl_grad_into(student, student, teacher, stats, scale[chunk], backend, tiles)
                del student, teacher
            if want_hidden:
                torch.mm(group_logits, student_weight, out=grad_hidden[group])
            if want_weight:
                _accumulate_weight_grad(grad_weight, group_logits, student_hidden[group], chunks.rows * vocab_shard)
            del group_logits
        loss = torch.where(scale != 0, scale * kl, 0.0).sum()
        ctx.mark_non_differentiable(kl)
        ctx.grad_hidden, ctx.into_main_grad = grad_hidden, into_main_grad
        ctx.grad_weight = grad_weight if want_weight and not into_main_grad else None
        ctx.weight_dtype = student_weight.dtype
        ctx.weight_told_of_main_grad = student_weight if into_main_grad and hasattr(student_weight, "grad_added_to_main_grad") else None
        return loss, kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_kl: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.into_main_grad and grad_loss.item() != 1.0:
            raise RuntimeError(
                f"fused_output_reverse_kl added the output weight's gradient into main_grad in forward, for an "
                f"upstream gradient of 1, but backward got {grad_loss.item()} (a scaled or divided loss)"
            )
        grad_hidden = None if ctx.grad_hidden is None else ctx.grad_hidden.mul_(grad_loss.to(ctx.grad_hidden.dtype))
        grad_weight = None if ctx.grad_weight is None else ctx.grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        weight = ctx.weight_told_of_main_grad
        if weight is not None:
            grad_weight = _placeholder_grad(weight)
        ctx.grad_hidden = ctx.grad_weight = ctx.weight_told_of_main_grad = None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _placeholder_grad(weight: Tensor) -> Tensor:
    """What backward returns for a weight whose gradient went into ``main_grad`` in forward, as megatron's
    linear layers do under ``gradient_accumulation_fusion``: megatron DDP's hook asserts a ``.grad`` under
    overlap_grad_reduce, and adds none to ``main_grad`` once ``grad_added_to_main_grad`` is set, except
    for a weight marked ``zero_out_wgrad`` (a tied embedding on one stage, whose lookup adds a gradient):
    that one gets zeros."""
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.shape, dtype=weight.dtype, device=weight.device)


def fused_output_reverse_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    token_weights: Tensor,
    tp_group: ProcessGroup | None = None,
    *,
    vocab_padding: slice | None = None,
    chunk_bytes: int | None = None,
    backend: Backend = "auto",
) -> FusedOutputLoss:
    """``sum_i token_weights_i * KL(p_student,i || p_teacher,i)`` of ``softmax(hidden @ weight.T)`` over
    the full, TP-sharded vocabulary, token chunk by token chunk, gradients computed in forward.

    Args:
        student_hidden: ``[N, H]`` final hidden states at the response positions (after the final
            norm); receives this rank's partial gradient (all-reduce it over ``tp_group``).
        student_weight: ``[V/TP, H]`` this rank's shard of the output (or tied embedding) weight.
            Its gradient goes into ``main_grad`` during forward when it has one (megatron-core DDP;
            backward must then receive an upstream gradient of exactly 1), else to ``.grad``.
        teacher_hidden, teacher_weight: the teacher's, same shapes; never receive gradients.
        token_weights: ``[N]`` each token's weight in the loss (0: masked out).
        tp_group: the group the vocabulary is split over (``None``: full vocabulary).
        vocab_padding: columns of this rank's shard that are vocabulary padding (set to ``-inf``).
        chunk_bytes: byte budget of the logits held at once: a group's student logits (then their
            gradient) and one chunk's teacher logits, chunks of a quarter of the budget's rows; default
            1/8 of one bf16 copy of this rank's logits, but chunks of at least 256 tokens. (The torch
            backend's fp32 temporaries come on top, bounded as in ``vocab_parallel_reverse_kl``.)
            Results do not depend on it beyond rounding.
        backend: as in ``vocab_parallel_reverse_kl``.

    Returns:
        the loss (with gradient) and the per-token KL (without), which equals
        ``vocab_parallel_reverse_kl`` of the logits.
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states must be [N, H] and equal in shape, got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape != teacher_weight.shape or student_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(
            f"output weights must be [V/TP, H={student_hidden.shape[1]}] and equal in shape, got "
            f"{tuple(student_weight.shape)} and {tuple(teacher_weight.shape)}"
        )
    if token_weights.shape != student_hidden.shape[:1]:
        raise ValueError(f"token_weights must be [N={student_hidden.shape[0]}], got {tuple(token_weights.shape)}")
    resolved = resolve_backend(backend, student_hidden, teacher_hidden)
    n_tokens, vocab_shard = student_hidden.shape[0], student_weight.shape[0]
    chunks = chunking(n_tokens, vocab_shard, student_hidden.element_size(), chunk_bytes)
    with_grads = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    loss, kl = _FusedOutputReverseKL.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, token_weights.detach(), tp_group,
        vocab_padding, chunks, resolved, with_grads,
    )
    return FusedOutputLoss(loss, kl)
