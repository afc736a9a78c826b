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

Memory (torch backend): the fp32 work runs over tiles of the flattened ``[N, V/TP]`` logits (a
tile's size bounded by a byte budget, see ``tiling``): the maxima in the input dtype without any
copy, then the three sums tile by tile; the collectives come once for all N tokens. Backward writes
the gradient tile by tile into one buffer of the student logits' dtype, or over the student
logits themselves (``grad_in_place``). Extra memory over the inputs: that gradient (1x a bf16
shard for bf16 logits; none in place, unless the logits cannot be viewed as ``[N, V/TP]`` rows and
are copied), the per-token statistics, and one tile's temporaries (<= 0.2x of a bf16 shard in
forward, <= 0.14x in backward, from 1.875 MiB of bf16 logits up; at most 384 KiB below that, so
1.25x in all from 1 MiB). The Triton backend has no tile temporaries at all.

Conventions: every computation is in fp32 (fp64 when an input is fp64, which exists so the
gradient can be finite-difference checked). Vocabulary padding arrives as ``-inf`` in the same
columns of both inputs; columns where the first distribution has zero probability contribute
exactly 0 (``0 * log 0 = 0``), and a column where :math:`p_S > 0` but :math:`p_T = 0` makes the
reverse KL ``+inf``, as it should. A row without any finite logit has no distribution: its KL is
nan and its gradient 0 (both backends). Identical inputs give exactly 0. The value is clamped at 0:
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


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor, grad_in_place: bool) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"logits on different devices: {student_logits.device} and {teacher_logits.device}")
    if student_logits.dim() == 0:
        raise ValueError("logits need a vocabulary dimension")
    if grad_in_place and student_logits.requires_grad and student_logits.is_leaf:
        raise ValueError("grad_in_place=True on leaf logits: their .grad would be their own storage; pass an op's output")
    if grad_in_place and any(stride == 0 and size > 1 for size, stride in zip(student_logits.shape, student_logits.stride())):
        raise ValueError(
            f"grad_in_place=True on logits whose elements share memory (strides {student_logits.stride()}, e.g. "
            "from expand): one token's gradient would overwrite logits another token still reads"
        )


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


# Tiling. The fp32 work runs over tiles of the flattened [N, V/TP] logits so that its temporaries
# stay a small fraction of them: a tile holds at most three fp32 buffers, 12 bytes per element in
# fp32 (24 in fp64). The default byte budget of a tile is _TILE_FRACTION of one bf16 copy of the
# logits, so forward's three buffers add <= 0.2x of a bf16 shard and backward's two (next to the
# 1.00x gradient) <= 0.14x: a tile is a block of whole rows (tokens) when one row fits the budget,
# else a piece of one row (the vocabulary sums simply add across pieces, since the maxima come
# first). About 30 tiles at any size, but never fewer than _MIN_TILE_ELEMENTS elements: each tile
# costs some 15 torch calls, which a toy model's logits (tens of thousands of elements) would spend
# 30 times over (5-10% of a toy training step, measured). So the fractions above hold from 1.875 MiB
# of bf16 logits per rank, the 1.25x bound in all from 1 MiB (T >= 4 at Qwen3's vocabulary, T >= 28
# at TP = 8); below that the temporaries are at most 384 KiB in forward and 256 KiB in backward.
_TILE_FRACTION = 0.2
_MIN_TILE_ELEMENTS = 32768
_BYTES_PER_ELEMENT = {torch.float32: 12, torch.float64: 24}


class Tiling(NamedTuple):
    """Tiles of ``rows`` tokens x ``columns`` vocabulary entries (``rows`` is 1 when ``columns`` is
    less than the whole shard)."""

    rows: int
    columns: int

    def tiles(self, n_rows: int, vocab: int) -> list[tuple[slice, slice]]:
        return [
            (slice(row, min(row + self.rows, n_rows)), slice(column, min(column + self.columns, vocab)))
            for row in range(0, n_rows, self.rows)
            for column in range(0, vocab, self.columns)
        ]


def tiling(n_rows: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None) -> Tiling:
    """Tiles whose fp32 temporaries fit in ``chunk_bytes`` (default: see above)."""
    if chunk_bytes is None:
        chunk_bytes = max(_MIN_TILE_ELEMENTS * _BYTES_PER_ELEMENT[dtype], int(_TILE_FRACTION * 2 * n_rows * vocab))
    elements = max(1, chunk_bytes // _BYTES_PER_ELEMENT[dtype])
    vocab = max(1, vocab)
    if elements < vocab:
        return Tiling(1, elements)
    return Tiling(max(1, min(n_rows, elements // vocab)), vocab)


def _shifted(logits: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``out := logits - shift[:, None]`` in ``out``'s (compute) dtype, allocating nothing.

    On CPU a mixed-dtype ``torch.sub(..., out=)`` first casts the input into a temporary of the
    tile's size, so there the cast goes through ``out`` itself; on CUDA the cast is fused.
    """
    if logits.dtype != out.dtype and logits.device.type == "cpu":
        return out.copy_(logits).sub_(shift.unsqueeze(-1))
    return torch.sub(logits, shift.unsqueeze(-1), out=out)


class _Workspace:
    """One tile's fp32 temporaries, allocated once and reused by every tile (no allocator churn)."""

    def __init__(self, shape: Tiling, dtype: torch.dtype, device: torch.device, buffers: int) -> None:
        self.buffers = [torch.empty(shape.rows, shape.columns, dtype=dtype, device=device) for _ in range(buffers)]

    def views(self, rows: slice, columns: slice) -> list[Tensor]:
        """Contiguous: a tile narrower than the buffer is a piece of one row."""
        return [buffer[: rows.stop - rows.start, : columns.stop - columns.start] for buffer in self.buffers]


def _safe_shift(maxima: Tensor) -> Tensor:
    """The maxima, with 0 where a row has no finite entry (its sums are 0 and stay 0)."""
    return torch.where(maxima == float("-inf"), torch.zeros_like(maxima), maxima)


def _local_statistics_torch(x_logits: Tensor, y_logits: Tensor, dtype: torch.dtype, shape: Tiling) -> Tensor:
    """``[5, N]`` rows ``(mu_x, mu_y, z_x, z_y, w)`` of this shard, shifted by its own maxima."""
    n_rows = x_logits.shape[0]
    local = torch.empty(5, n_rows, dtype=dtype, device=x_logits.device)
    local[2:].zero_()  # the sums add over a row's pieces
    # The maximum is exact in the input dtype and needs no fp32 copy of the logits.
    torch.amax(x_logits, dim=-1, out=local[0]) if x_logits.dtype == dtype else local[0].copy_(x_logits.amax(-1))
    torch.amax(y_logits, dim=-1, out=local[1]) if y_logits.dtype == dtype else local[1].copy_(y_logits.amax(-1))
    shift_x, shift_y = _safe_shift(local[0]), _safe_shift(local[1])
    work = _Workspace(shape, dtype, x_logits.device, buffers=3)
    for rows, columns in shape.tiles(n_rows, x_logits.shape[1]):
        shifted_x, diff, probs = work.views(rows, columns)
        _shifted(x_logits[rows, columns], shift_x[rows], shifted_x)  # fp32 from any dtype
        _shifted(y_logits[rows, columns], shift_y[rows], diff)
        local[3, rows] += torch.exp(diff, out=probs).sum(-1)  # z_y
        torch.sub(shifted_x, diff, out=diff)  # diff := (x - mu_x) - (y - mu_y)
        local[2, rows] += torch.exp(shifted_x, out=probs).sum(-1)  # z_x; probs: un-normalized p_x
        # Zero-probability columns contribute exactly 0: where one side is -inf, 0 * (+-inf or nan)
        # is nan there, and nansum skips it. (A nan logit still makes the KL nan: z_x or z_y is.)
        local[4, rows] += probs.mul_(diff).nansum(-1)
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
    # Mass that underflows to 0 in the new shift contributes 0, as it does within one tile: its w
    # may be +inf (the other side -inf there), and alpha * inf with alpha = 0 would be nan. A nan
    # (from a nan logit) is kept: "not <= 0" is true for it, so the KL comes out nan, as in one shard.
    has_x = ~(alpha * z_x <= 0)
    return torch.stack([
        torch.where(has_x, alpha * z_x, 0.0),
        torch.where(~(z_y <= 0), offset_y.exp() * z_y, 0.0),
        torch.where(has_x, alpha * (w + (offset_x - offset_y) * z_x), 0.0),
    ], dim=-2)


def local_statistics(x_logits: Tensor, y_logits: Tensor, backend: Literal["torch", "triton"], shape: Tiling) -> Tensor:
    """``[5, N]`` rows ``(mu_x, mu_y, z_x, z_y, w)`` of 2-D ``[N, columns]`` logits, shifted by their
    own maxima (``shape``: the torch backend's tiles)."""
    if backend == "triton":
        from opsdc_megatron.loss import triton_kernels

        return triton_kernels.local_statistics(x_logits, y_logits)
    return _local_statistics_torch(x_logits, y_logits, compute_dtype(x_logits, y_logits), shape)


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
    x_logits: Tensor, y_logits: Tensor, group: ProcessGroup | None, backend: Literal["torch", "triton"], shape: Tiling
) -> KLStatistics:
    """Statistics of KL(p_x || p_y) for 2-D ``[N, V/TP]`` shards (``shape``: the torch backend's tiles)."""
    return merge_statistics(local_statistics(x_logits, y_logits, backend, shape), group)


def _without_empty_rows(log_z: Tensor) -> Tensor:
    """``log_z`` with +inf for rows without any finite logit, whose probabilities then come out 0
    rather than ``exp(-inf - -inf) = nan``: such a row (all -inf, e.g. a fully padded one) has no
    distribution and its KL is nan, but its gradient is 0, as in the Triton kernel, so a masked-out
    row cannot turn the whole batch's weight gradients into nan through the output layer."""
    return log_z.masked_fill(log_z == float("-inf"), float("inf"))


def reverse_kl_grad_into(
    grad: Tensor, student: Tensor, teacher: Tensor, stats: KLStatistics, scale: Tensor,
    backend: Literal["torch", "triton"], shape: Tiling,
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
    log_z_s = _without_empty_rows(stats.log_z_x)
    c = torch.where(torch.isinf(log_z_s), 0.0, stats.c)  # c = 0/0 on an empty row
    work = _Workspace(shape, stats.c.dtype, student.device, buffers=2)
    for rows, columns in shape.tiles(*student.shape):
        shifted_s, diff = work.views(rows, columns)
        _shifted(student[rows, columns], stats.shift_x[rows], shifted_s).clamp_min_(lowest)
        _shifted(teacher[rows, columns], stats.shift_y[rows], diff).clamp_min_(lowest)
        torch.sub(shifted_s, diff, out=diff).sub_(c[rows].unsqueeze(-1))  # log p_s - log p_t - KL
        probs_s = shifted_s.sub_(log_z_s[rows].unsqueeze(-1)).exp_()
        grad[rows, columns].copy_(probs_s.mul_(diff).mul_(scale[rows].unsqueeze(-1)))


def _forward_kl_grad_into(grad: Tensor, student: Tensor, teacher: Tensor, stats: KLStatistics, scale: Tensor, shape: Tiling) -> None:
    """``grad := (p_s - p_t) * scale``; ``stats`` are those of KL(p_t || p_s)."""
    log_z_s, log_z_t = _without_empty_rows(stats.log_z_y), _without_empty_rows(stats.log_z_x)
    work = _Workspace(shape, stats.c.dtype, student.device, buffers=2)
    for rows, columns in shape.tiles(*student.shape):
        probs_s, probs_t = work.views(rows, columns)
        # -inf padding gives exp(-inf) = 0 in both terms: no masking needed.
        # Shift by the max before subtracting log Z: no rounding of m + log Z at large logits.
        _shifted(student[rows, columns], stats.shift_y[rows], probs_s)
        probs_s.sub_(log_z_s[rows].unsqueeze(-1)).exp_()
        _shifted(teacher[rows, columns], stats.shift_x[rows], probs_t)
        probs_t.sub_(log_z_t[rows].unsqueeze(-1)).exp_()
        grad[rows, columns].copy_(probs_s.sub_(probs_t).mul_(scale[rows].unsqueeze(-1)))


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
        grad_in_place: bool,
    ) -> Tensor:
        dtype = compute_dtype(student_logits, teacher_logits)
        student, teacher = _flatten(student_logits), _flatten(teacher_logits)
        shape = tiling(student.shape[0], student.shape[1], dtype, chunk_bytes)
        x, y = (student, teacher) if reverse else (teacher, student)
        stats = kl_statistics(x, y, group, backend, shape)
        ctx.save_for_backward(student_logits, teacher_logits, *stats[1:])
        ctx.tiling, ctx.reverse, ctx.backend, ctx.grad_in_place = shape, reverse, backend, grad_in_place
        return stats.kl.reshape(student_logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:
        student_logits, teacher_logits, *saved = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        stats = KLStatistics(None, *saved)
        student, teacher = _flatten(student_logits), _flatten(teacher_logits)
        scale = grad_output.reshape(-1).to(stats.c.dtype)
        # In place: each tile of the student logits is read before its gradient is written over it.
        grad = student if ctx.grad_in_place else torch.empty_like(student, memory_format=torch.contiguous_format)
        if ctx.reverse:
            reverse_kl_grad_into(grad, student, teacher, stats, scale, ctx.backend, ctx.tiling)
        else:
            _forward_kl_grad_into(grad, student, teacher, stats, scale, ctx.tiling)
        return grad.view(student_logits.shape), None, None, None, None, None, None


def vocab_parallel_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tp_group: ProcessGroup | None = None,
    *,
    chunk_bytes: int | None = None,
    backend: Backend = "auto",
    grad_in_place: bool = False,
) -> Tensor:
    """Exact per-token reverse KL(p_student || p_teacher) over the full, TP-sharded vocabulary.

    Args:
        student_logits: this rank's vocabulary shard ``[..., V/TP]`` (any float dtype); receives
            the gradient ``p_s * (log p_s - log p_t - KL) * grad_out``.
        teacher_logits: same shape and columns; never receives a gradient.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` or a group of
            one rank means the inputs hold the full vocabulary.
        chunk_bytes: torch backend: byte budget of one tile's fp32 temporaries (default: 0.2x of a
            bf16 copy of the logits). Results do not depend on it beyond rounding.
        backend: ``auto`` (Triton on CUDA, torch otherwise), ``torch`` or ``triton``.
        grad_in_place: write the gradient over ``student_logits`` (no gradient buffer: the extra
            memory drops by one logits shard), for a caller that no longer needs their values and
            whose graph saved them for nothing else (autograd then refuses the backward: "modified
            by an inplace operation"). Refused for leaf logits and for logits whose elements share
            memory.

    Returns:
        ``student_logits.shape[:-1]``, float32 (float64 for float64 inputs), identical on all ranks.
    """
    _check_inputs(student_logits, teacher_logits, grad_in_place)
    resolved = resolve_backend(backend, student_logits, teacher_logits)
    return _VocabParallelKL.apply(student_logits, teacher_logits, tp_group, chunk_bytes, True, resolved, grad_in_place)


def vocab_parallel_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tp_group: ProcessGroup | None = None,
    *,
    chunk_bytes: int | None = None,
    grad_in_place: bool = False,
) -> Tensor:
    """Exact per-token forward KL(p_teacher || p_student); same conventions as the reverse KL.

    The student's gradient is ``(p_s - p_t) * grad_out``; the teacher never receives one. Kept for
    the forward-KL ablation (the paper reports that it collapses); torch backend only.
    """
    _check_inputs(student_logits, teacher_logits, grad_in_place)
    return _VocabParallelKL.apply(student_logits, teacher_logits, tp_group, chunk_bytes, False, "torch", grad_in_place)
