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

:math:`Z_s, Z_t` and the un-normalized sum :math:`w = \sum_v e^{a_v}(a_v - b_v)` are plain sums over
the vocabulary. Each rank computes them over its shard, shifted by its *own* maxima
:math:`\mu_s, \mu_t`; one MAX all-reduce gives the global maxima and, with
:math:`\alpha = e^{\mu_s - m_s}` and :math:`\delta = (\mu_s - m_s) - (\mu_t - m_t)`, the shard's sums in
the global shift are :math:`\alpha z_s`, :math:`e^{\mu_t - m_t} z_t` and :math:`\alpha (w + \delta z_s)`;
one SUM all-reduce adds them. Two collectives of per-token statistics, the logits never gathered,
and each logits tensor read once for the statistics (the Triton kernel applies the same rescaling
online, tile by tile, within a shard). Every term stays bounded by :math:`|\log p|`, so there is
no cancellation between huge logits even at magnitude 1e4, and identical inputs give exactly 0.

Gradient (student only; the teacher is a stop-gradient target):

.. math::

    \frac{\partial\,\mathrm{KL}(p_S\|p_T)}{\partial s_v}
      = p_S(v)\bigl(\log p_S(v) - \log p_T(v) - \mathrm{KL}\bigr)
      = p_S(v)\,\bigl((a_v - b_v) - c\bigr),

which is local to each shard given the per-token :math:`m_s, m_t, \log Z_s, c`. Only those
statistics (and references to the input logits) are saved; the softmax is recomputed in backward.

The forward KL (ablation; the paper reports it collapses) is the same computation with the roles
swapped, :math:`\mathrm{KL}(p_T\|p_S)`, and :math:`\partial/\partial s_v = p_S(v) - p_T(v)`.

Backends: ``backend="auto"`` runs the Triton kernels of ``triton_kernels.py`` on CUDA inputs
(bf16/fp16/fp32) and the torch code below otherwise; both compute the same statistics. The forward
KL (an ablation) always runs the torch code.

Memory (torch backend): the fp32 work runs over blocks of tokens of the flattened ``[N, V/TP]``
logits (the block size bounded by a byte budget, see ``_chunk_rows``): the maxima in the input
dtype without any copy, then the three sums block by block; the collectives come once for all N
tokens. Backward writes the gradient block by block into one buffer of the student logits' dtype.
Extra memory over the inputs: that gradient (1x a bf16 shard for bf16 logits), the per-token
statistics, and one block's temporaries (<= 0.2x of a bf16 shard by default, but at least 16 MiB: below
~45 MiB of bf16 logits, e.g. T < 150 at V = 151,936, the total passes 1.25x). The Triton backend
has no block temporaries at all.

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

import warnings
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

__all__ = ["vocab_parallel_reverse_kl", "vocab_parallel_forward_kl"]

Backend = Literal["auto", "torch", "triton"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
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


_warned_no_triton = False


def resolve_backend(backend: Backend, *tensors: Tensor) -> Literal["torch", "triton"]:
    """``auto``: Triton for CUDA tensors of at most fp32 precision, torch otherwise.

    A CUDA run without an importable Triton falls back to torch with a warning naming the import
    error (torch's CUDA wheels ship Triton, so this means a broken install). ``triton`` on CPU
    tensors needs ``TRITON_INTERPRET=1`` (used by the tests).
    """
    global _warned_no_triton
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend != "auto":
        return backend
    if not all(t.is_cuda for t in tensors) or compute_dtype(*tensors) != torch.float32:
        return "torch"
    try:
        from opsdc_megatron.loss import triton_kernels  # noqa: F401
    except ImportError as error:
        if not _warned_no_triton:
            warnings.warn(f"reverse KL on CUDA without Triton ({error}); using the slower torch backend", stacklevel=3)
            _warned_no_triton = True
        return "torch"
    return "triton"


# Chunking. The fp32 work runs over blocks of tokens so that its temporaries stay a small fraction
# of the logits: a block holds at most three fp32 [rows, V/TP] buffers, i.e. 12 bytes per element
# in fp32 (24 in fp64). The default byte budget for one block is
# _CHUNK_FRACTION of one bf16 copy of the logits (so the temporaries add <= 0.2x of a bf16 shard),
# but never less than _MIN_CHUNK_BYTES (tiny inputs still run in one or a few blocks; there the
# temporaries pass 0.2x of the shard, by at most 16 MiB: measured 1.67x in all at T = 256, V = 32,000).
_CHUNK_FRACTION = 0.2
_MIN_CHUNK_BYTES = 16 << 20
_BYTES_PER_ELEMENT = {torch.float32: 12, torch.float64: 24}


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Tokens per block: the block's fp32 temporaries fit in ``chunk_bytes`` (see above)."""
    if chunk_bytes is None:
        chunk_bytes = max(_MIN_CHUNK_BYTES, int(_CHUNK_FRACTION * 2 * n_rows * vocab))
    per_row = max(1, vocab) * _BYTES_PER_ELEMENT[dtype]
    return max(1, min(n_rows, chunk_bytes // per_row))


def _blocks(n_rows: int, rows: int) -> list[slice]:
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def _shifted(logits: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``out := logits - shift[:, None]`` in ``out``'s (compute) dtype, allocating nothing.

    On CPU a mixed-dtype ``torch.sub(..., out=)`` first casts the input into a temporary of the
    block's size, so there the cast goes through ``out`` itself; on CUDA the cast is fused.
    """
    if logits.dtype != out.dtype and logits.device.type == "cpu":
        return out.copy_(logits).sub_(shift.unsqueeze(-1))
    return torch.sub(logits, shift.unsqueeze(-1), out=out)


class _Workspace:
    """One block's fp32 temporaries, allocated once and reused by every block (no allocator churn)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, buffers: int) -> None:
        self.buffers = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(buffers)]

    def views(self, block: slice) -> list[Tensor]:
        return [buffer[: block.stop - block.start] for buffer in self.buffers]


def _safe_shift(maxima: Tensor) -> Tensor:
    """The maxima, with 0 where a row has no finite entry (its sums are 0 and stay 0)."""
    return torch.where(maxima == float("-inf"), torch.zeros_like(maxima), maxima)


def _local_statistics_torch(x_logits: Tensor, y_logits: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """``[5, N]`` rows ``(mu_x, mu_y, z_x, z_y, w)`` of this shard, shifted by its own maxima."""
    n_rows = x_logits.shape[0]
    local = torch.empty(5, n_rows, dtype=dtype, device=x_logits.device)
    # The maximum is exact in the input dtype and needs no fp32 copy of the logits.
    torch.amax(x_logits, dim=-1, out=local[0]) if x_logits.dtype == dtype else local[0].copy_(x_logits.amax(-1))
    torch.amax(y_logits, dim=-1, out=local[1]) if y_logits.dtype == dtype else local[1].copy_(y_logits.amax(-1))
    shift_x, shift_y = _safe_shift(local[0]), _safe_shift(local[1])
    work = _Workspace(rows, x_logits.shape[1], dtype, x_logits.device, buffers=3)
    for block in _blocks(n_rows, rows):
        shifted_x, diff, probs = work.views(block)
        _shifted(x_logits[block], shift_x[block], shifted_x)  # fp32 from any dtype
        _shifted(y_logits[block], shift_y[block], diff)
        torch.sum(torch.exp(diff, out=probs), dim=-1, out=local[3, block])  # z_y
        torch.sub(shifted_x, diff, out=diff)  # diff := (x - mu_x) - (y - mu_y)
        torch.sum(torch.exp(shifted_x, out=probs), dim=-1, out=local[2, block])  # z_x; probs: un-normalized p_x
        # Zero-probability columns contribute exactly 0: where one side is -inf, 0 * (+-inf or nan)
        # is nan there, and nansum skips it. (A nan logit still makes the KL nan: z_x or z_y is.)
        torch.nansum(probs.mul_(diff), dim=-1, out=local[4, block])
    return local


class KLStatistics(NamedTuple):
    """Per-token statistics of KL(p_x || p_y) over the full vocabulary, identical on all ranks."""

    kl: Tensor
    shift_x: Tensor  # global maximum of x (0 for a row without finite entries)
    shift_y: Tensor
    log_z_x: Tensor  # log partition function of x - shift_x
    log_z_y: Tensor
    c: Tensor  # E_{p_x}[(x - shift_x) - (y - shift_y)]


def _rescaled_sums(local: Tensor, maxima: Tensor) -> Tensor:
    """``(z_x, z_y, w)`` of ``local`` ``[..., 5, N]`` (shifted by its own maxima) re-expressed in the
    shift of ``maxima`` ``[2, N]`` (>= the local ones): ``alpha z_x``, ``e^{mu_y - m_y} z_y``,
    ``alpha (w + delta z_x)``."""
    offset = _safe_shift(local[..., :2, :]) - _safe_shift(maxima)  # <= 0 wherever there is mass
    offset_x, offset_y = offset.unbind(-2)
    z_x, z_y, w = local[..., 2:, :].unbind(-2)
    alpha = offset_x.exp()
    # Mass that underflows to 0 in the new shift contributes 0, as it does within one block: its w
    # may be +inf (the other side -inf there), and alpha * inf with alpha = 0 would be nan.
    has_x = alpha * z_x > 0
    return torch.stack([
        torch.where(has_x, alpha * z_x, 0.0),
        torch.where(z_y > 0, offset_y.exp() * z_y, 0.0),
        torch.where(has_x, alpha * (w + (offset_x - offset_y) * z_x), 0.0),
    ], dim=-2)


def local_statistics(x_logits: Tensor, y_logits: Tensor, backend: Literal["torch", "triton"], rows: int) -> Tensor:
    """``[5, N]`` rows ``(mu_x, mu_y, z_x, z_y, w)`` of 2-D ``[N, columns]`` logits, shifted by their
    own maxima (``rows``: the torch backend's block of tokens)."""
    if backend == "triton":
        from opsdc_megatron.loss import triton_kernels

        return triton_kernels.local_statistics(x_logits, y_logits)
    return _local_statistics_torch(x_logits, y_logits, compute_dtype(x_logits, y_logits), rows)


def merge_statistics(local: Tensor, group: ProcessGroup | None) -> KLStatistics:
    """Shard statistics from ``local_statistics`` to global ones: one MAX and one SUM all-reduce."""
    if _is_parallel(group):
        maxima = local[:2].clone()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        sums = _rescaled_sums(local, maxima)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    else:  # the shard is the whole vocabulary: its own shifts are the global ones
        maxima, sums = local[:2], local[2:]
    z_x, z_y, weighted = sums[0], sums[1], sums[2]
    c = weighted / z_x
    # Clamped at 0 because true KL >= 0, so this only moves a rounded value toward the truth:
    # unclamped, near-identical distributions measure down to about -4e-7 (the fp32 rounding of
    # the vocabulary sums). NaN and +inf pass through unchanged. Backward ignores the clamp.
    # The ratio rounds once, where log Z_y - log Z_x would round each log at the magnitude of log V.
    kl = (c + (z_y / z_x).log()).clamp_min_(0.0)
    shift = _safe_shift(maxima)
    return KLStatistics(kl, shift[0], shift[1], z_x.log(), z_y.log(), c)


def kl_statistics(
    x_logits: Tensor, y_logits: Tensor, group: ProcessGroup | None, backend: Literal["torch", "triton"], rows: int
) -> KLStatistics:
    """Statistics of KL(p_x || p_y) for 2-D ``[N, V/TP]`` shards (``rows``: torch block size)."""
    return merge_statistics(local_statistics(x_logits, y_logits, backend, rows), group)


def reverse_kl_grad_into(
    grad: Tensor, student: Tensor, teacher: Tensor, stats: KLStatistics, scale: Tensor,
    backend: Literal["torch", "triton"], rows: int,
) -> None:
    """``grad := p_s * ((s - m_s) - (t - m_t) - c) * scale`` for 2-D shards, zero where ``p_s == 0``."""
    if backend == "triton":
        from opsdc_megatron.loss.triton_kernels import reverse_kl_grad_into as triton_grad_into

        triton_grad_into(grad, student, teacher, stats.shift_x, stats.shift_y, stats.log_z_x, stats.c, scale)
        return
    # -inf logits become the most negative finite value: p_s stays exactly 0 there, and (a - b) stays
    # finite, so those columns get 0 * finite = 0 (a row whose KL is not finite gets a non-finite
    # gradient either way). Cheaper than masking by p_s == 0 (a bool pass and a masked write).
    lowest = torch.finfo(stats.c.dtype).min
    work = _Workspace(rows, student.shape[1], stats.c.dtype, student.device, buffers=2)
    for block in _blocks(student.shape[0], rows):
        shifted_s, diff = work.views(block)
        _shifted(student[block], stats.shift_x[block], shifted_s).clamp_min_(lowest)
        _shifted(teacher[block], stats.shift_y[block], diff).clamp_min_(lowest)
        torch.sub(shifted_s, diff, out=diff).sub_(stats.c[block].unsqueeze(-1))  # log p_s - log p_t - KL
        probs_s = shifted_s.sub_(stats.log_z_x[block].unsqueeze(-1)).exp_()
        grad[block].copy_(probs_s.mul_(diff).mul_(scale[block].unsqueeze(-1)))


def _forward_kl_grad_into(grad: Tensor, student: Tensor, teacher: Tensor, stats: KLStatistics, scale: Tensor, rows: int) -> None:
    """``grad := (p_s - p_t) * scale``; ``stats`` are those of KL(p_t || p_s)."""
    work = _Workspace(rows, student.shape[1], stats.c.dtype, student.device, buffers=2)
    for block in _blocks(student.shape[0], rows):
        probs_s, probs_t = work.views(block)
        # -inf padding gives exp(-inf) = 0 in both terms: no masking needed.
        # Shift by the max before subtracting log Z: no rounding of m + log Z at large logits.
        _shifted(student[block], stats.shift_y[block], probs_s)
        probs_s.sub_(stats.log_z_y[block].unsqueeze(-1)).exp_()
        _shifted(teacher[block], stats.shift_x[block], probs_t)
        probs_t.sub_(stats.log_z_x[block].unsqueeze(-1)).exp_()
        grad[block].copy_(probs_s.sub_(probs_t).mul_(scale[block].unsqueeze(-1)))


def _flatten(logits: Tensor) -> Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL, reverse (p_s || p_t) or forward (p_t || p_s); backward recomputes the softmax
    from the saved per-token statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        group: ProcessGroup | None,
        chunk_bytes: int | None,
        reverse: bool,
        backend: Literal["torch", "triton"],
    ) -> Tensor:
        dtype = compute_dtype(student_logits, teacher_logits)
        student, teacher = _flatten(student_logits), _flatten(teacher_logits)
        rows = chunk_rows(student.shape[0], student.shape[1], dtype, chunk_bytes)
        x, y = (student, teacher) if reverse else (teacher, student)
        stats = kl_statistics(x, y, group, backend, rows)
        ctx.save_for_backward(student_logits, teacher_logits, *stats[1:])
        ctx.rows, ctx.reverse, ctx.backend = rows, reverse, backend
        return stats.kl.reshape(student_logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        student_logits, teacher_logits, *saved = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        stats = KLStatistics(None, *saved)
        student, teacher = _flatten(student_logits), _flatten(teacher_logits)
        scale = grad_output.reshape(-1).to(stats.c.dtype)
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        if ctx.reverse:
            reverse_kl_grad_into(grad, student, teacher, stats, scale, ctx.backend, ctx.rows)
        else:
            _forward_kl_grad_into(grad, student, teacher, stats, scale, ctx.rows)
        return grad.view(student_logits.shape), None, None, None, None, None


def vocab_parallel_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tp_group: ProcessGroup | None = None,
    *,
    chunk_bytes: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Exact per-token reverse KL(p_student || p_teacher) over the full, TP-sharded vocabulary.

    Args:
        student_logits: this rank's vocabulary shard ``[..., V/TP]`` (any float dtype); receives
            the gradient ``p_s * (log p_s - log p_t - KL) * grad_out``.
        teacher_logits: same shape and columns; never receives a gradient.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` or a group of
            one rank means the inputs hold the full vocabulary.
        chunk_bytes: torch backend: byte budget of one block of tokens' fp32 temporaries (default:
            0.2x of a bf16 copy of the logits, at least 16 MiB). Results do not depend on it.
        backend: ``auto`` (Triton on CUDA, torch otherwise), ``torch`` or ``triton``.

    Returns:
        ``student_logits.shape[:-1]``, float32 (float64 for float64 inputs), identical on all ranks.
    """
    _check_inputs(student_logits, teacher_logits)
    resolved = resolve_backend(backend, student_logits, teacher_logits)
    return _VocabParallelKL.apply(student_logits, teacher_logits, tp_group, chunk_bytes, True, resolved)


def vocab_parallel_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tp_group: ProcessGroup | None = None,
    *,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Exact per-token forward KL(p_teacher || p_student); same conventions as the reverse KL.

    The student's gradient is ``(p_s - p_t) * grad_out``; the teacher never receives one. Kept for
    the forward-KL ablation (the paper reports that it collapses); torch backend only.
    """
    _check_inputs(student_logits, teacher_logits)
    return _VocabParallelKL.apply(student_logits, teacher_logits, tp_group, chunk_bytes, False, "torch")
