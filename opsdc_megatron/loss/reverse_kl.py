r"""Exact full-vocabulary KL divergences on vocabulary-sharded (tensor-parallel) logits.

OPSDC / CRISP (arXiv 2603.05433) trains the student on the exact per-token reverse KL over the
whole vocabulary, with gradient into the student only:

.. math::

    \mathrm{KL}(p_S \,\|\, p_T) = \sum_v p_S(v)\,\bigl(\log p_S(v) - \log p_T(v)\bigr),
    \qquad p_S = \mathrm{softmax}(s),\; p_T = \mathrm{softmax}(t).

With tensor parallelism each rank holds a slice ``[..., V/TP]`` of both logit tensors. Write
:math:`m_x = \max_v x_v` (global), :math:`a_v = s_v - m_s`, :math:`b_v = t_v - m_t`,
:math:`Z_s = \sum_v e^{a_v}`, :math:`Z_t = \sum_v e^{b_v}`. Then
:math:`\log p_S(v) - \log p_T(v) = (a_v - b_v) - (\log Z_s - \log Z_t)` and

.. math::

    \mathrm{KL}(p_S \| p_T) = c + \log(Z_t / Z_s), \qquad
    c = \mathbb{E}_{p_S}[a - b] = \frac{1}{Z_s}\sum_v e^{a_v}(a_v - b_v).

:math:`Z_s, Z_t` and the un-normalized sum :math:`\sum_v e^{a_v}(a_v - b_v)` are all plain sums
over the vocabulary, so one SUM all-reduce carries all three after one MAX all-reduce of
:math:`(m_s, m_t)`: two collectives of per-token statistics, and the logits are never gathered.
Subtracting the (global) maxima before differencing keeps every term bounded by :math:`|\log p|`,
so there is no cancellation between huge logits even at magnitude 1e4, and identical inputs give
exactly 0.

Gradient (student only; the teacher is a stop-gradient target):

.. math::

    \frac{\partial\,\mathrm{KL}(p_S\|p_T)}{\partial s_v}
      = p_S(v)\bigl(\log p_S(v) - \log p_T(v) - \mathrm{KL}\bigr)
      = p_S(v)\,\bigl((a_v - b_v) - c\bigr),

which is local to each shard given the per-token :math:`m_s, m_t, \log Z_s, c`. Only those
statistics (and references to the input logits) are saved; the softmax is recomputed in backward.

The forward KL (ablation; the paper reports it collapses) is the same computation with the roles
swapped, :math:`\mathrm{KL}(p_T\|p_S)`, and :math:`\partial/\partial s_v = p_S(v) - p_T(v)`.

Conventions: every computation is in fp32 (fp64 when an input is fp64, which exists so the
gradient can be finite-difference checked). Vocabulary padding arrives as ``-inf`` in the same
columns of both inputs; columns where the first distribution has zero probability contribute
exactly 0 (``0 * log 0 = 0``), and a column where :math:`p_S > 0` but :math:`p_T = 0` makes the
reverse KL ``+inf``, as it should. Identical inputs give exactly 0. The value is clamped at 0:
the fp32 vocabulary sums leave an absolute error of a few 1e-7, which for (near-)identical
distributions measured down to -4e-7 before the clamp; clamping only removes error, because the
true KL is non-negative, and the gradient is the unclamped one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

__all__ = ["vocab_parallel_reverse_kl", "vocab_parallel_forward_kl"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 only if an input already is (for gradcheck)."""
    dtype = torch.float32
    for tensor in tensors:
        if not tensor.is_floating_point():
            raise TypeError(f"logits must be floating point, got {tensor.dtype}")
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _is_parallel(group: ProcessGroup | None) -> bool:
    """A group of one rank needs no collectives (and TP=1 callers may pass None)."""
    return group is not None and dist.get_world_size(group) > 1


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"logits on different devices: {student_logits.device} and {teacher_logits.device}")
    if student_logits.dim() == 0:
        raise ValueError("logits need a vocabulary dimension")


def _kl_statistics(
    x_logits: Tensor, y_logits: Tensor, dtype: torch.dtype, group: ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token statistics of KL(p_x || p_y) over the full (possibly sharded) vocabulary.

    Returns ``(kl, m_x, m_y, log_z_x, log_z_y, c)`` with global maxima ``m``, log partition
    functions of the shifted logits ``log Z`` and ``c = E_{p_x}[(x - m_x) - (y - m_y)]``;
    ``kl = c + log(Z_y / Z_x)`` (the ratio rounds once, where ``log Z_y - log Z_x`` would round
    each ``log`` at the magnitude of ``log V``). Two all-reduces when ``group`` spans several ranks.
    """
    x = x_logits.to(dtype)  # an alias when already in `dtype`: never modified in place
    y = y_logits.to(dtype)
    parallel = _is_parallel(group)

    maxima = torch.stack([x.amax(dim=-1), y.amax(dim=-1)])
    if parallel:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    m_x, m_y = maxima[0], maxima[1]

    shifted_x = x - m_x.unsqueeze(-1)
    diff = y - m_y.unsqueeze(-1)
    z_y = diff.exp().sum(dim=-1)
    diff.neg_().add_(shifted_x)  # diff := (x - m_x) - (y - m_y)
    del x, y
    probs_x = shifted_x.exp_()  # un-normalized p_x, reusing the buffer
    z_x = probs_x.sum(dim=-1)
    # Zero-probability columns (padding: -inf - (-inf) = nan) contribute exactly 0.
    diff.masked_fill_(probs_x == 0, 0.0)
    weighted = probs_x.mul_(diff).sum(dim=-1)
    del probs_x, diff

    sums = torch.stack([z_x, z_y, weighted])
    if parallel:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    z_x, z_y, weighted = sums[0], sums[1], sums[2]
    c = weighted / z_x
    # Clamped at 0 because true KL >= 0, so this only moves a rounded value toward the truth:
    # unclamped, near-identical distributions measure down to about -4e-7 (the fp32 rounding of
    # the vocabulary sums). NaN and +inf pass through unchanged. Backward ignores the clamp.
    kl = (c + (z_y / z_x).log()).clamp_min_(0.0)
    return kl, m_x, m_y, z_x.log(), z_y.log(), c


class _VocabParallelReverseKL(torch.autograd.Function):
    """KL(p_s || p_t) per token; backward recomputes the softmax from saved per-token statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, student_logits: Tensor, teacher_logits: Tensor, group: ProcessGroup | None
    ) -> Tensor:
        dtype = _compute_dtype(student_logits, teacher_logits)
        kl, m_s, m_t, log_z_s, _, c = _kl_statistics(student_logits, teacher_logits, dtype, group)
        ctx.save_for_backward(student_logits, teacher_logits, m_s, m_t, log_z_s, c)
        ctx.compute_dtype = dtype
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        student_logits, teacher_logits, m_s, m_t, log_z_s, c = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dtype = ctx.compute_dtype
        shifted_s = student_logits.to(dtype) - m_s.unsqueeze(-1)
        diff = teacher_logits.to(dtype) - m_t.unsqueeze(-1)
        diff.neg_().add_(shifted_s).sub_(c.unsqueeze(-1))  # log p_s - log p_t - KL
        probs_s = shifted_s.sub_(log_z_s.unsqueeze(-1)).exp_()
        diff.masked_fill_(probs_s == 0, 0.0)
        grad = probs_s.mul_(diff).mul_(grad_output.to(dtype).unsqueeze(-1))
        return grad.to(student_logits.dtype), None, None


class _VocabParallelForwardKL(torch.autograd.Function):
    """KL(p_t || p_s) per token; gradient p_s - p_t into the student, recomputed in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, student_logits: Tensor, teacher_logits: Tensor, group: ProcessGroup | None
    ) -> Tensor:
        dtype = _compute_dtype(student_logits, teacher_logits)
        kl, m_t, m_s, log_z_t, log_z_s, _ = _kl_statistics(teacher_logits, student_logits, dtype, group)
        ctx.save_for_backward(student_logits, teacher_logits, m_s, m_t, log_z_s, log_z_t)
        ctx.compute_dtype = dtype
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        student_logits, teacher_logits, m_s, m_t, log_z_s, log_z_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dtype = ctx.compute_dtype
        # -inf padding gives exp(-inf) = 0 in both terms: no masking needed.
        # Shift by the max before subtracting log Z: no rounding of m + log Z at large logits.
        probs_s = (student_logits.to(dtype) - m_s.unsqueeze(-1)).sub_(log_z_s.unsqueeze(-1)).exp_()
        probs_t = (teacher_logits.to(dtype) - m_t.unsqueeze(-1)).sub_(log_z_t.unsqueeze(-1)).exp_()
        grad = probs_s.sub_(probs_t).mul_(grad_output.to(dtype).unsqueeze(-1))
        return grad.to(student_logits.dtype), None, None


def vocab_parallel_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, tp_group: ProcessGroup | None = None
) -> Tensor:
    """Exact per-token reverse KL(p_student || p_teacher) over the full, TP-sharded vocabulary.

    Args:
        student_logits: this rank's vocabulary shard ``[..., V/TP]`` (any float dtype); receives
            the gradient ``p_s * (log p_s - log p_t - KL) * grad_out``.
        teacher_logits: same shape and columns; never receives a gradient.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` or a group of
            one rank means the inputs hold the full vocabulary.

    Returns:
        ``student_logits.shape[:-1]``, float32 (float64 for float64 inputs), identical on all ranks.
    """
    _check_inputs(student_logits, teacher_logits)
    return _VocabParallelReverseKL.apply(student_logits, teacher_logits, tp_group)


def vocab_parallel_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, tp_group: ProcessGroup | None = None
) -> Tensor:
    """Exact per-token forward KL(p_teacher || p_student); same conventions as the reverse KL.

    The student's gradient is ``(p_s - p_t) * grad_out``; the teacher never receives one. Kept for
    the forward-KL ablation (the paper reports that it collapses).
    """
    _check_inputs(student_logits, teacher_logits)
    return _VocabParallelForwardKL.apply(student_logits, teacher_logits, tp_group)
