"""Triton kernels for the reverse KL on CUDA: one read of each logits tensor in forward, one read of
each and one write of the gradient in backward (the 3-pass bandwidth floor plus one extra read of
each input for the forward statistics).

Each program owns one token row (or, for few rows, one of up to ``MAX_SPLITS`` column ranges of it)
and walks it in tiles of ``BLOCK_V`` columns, keeping five fp32 scalars ``(m_x, m_y, z_x, z_y, w)``:
running maxima, the partition sums of the shifted logits and
``w = sum_v e^{x_v - m_x} ((x_v - m_x) - (y_v - m_y))``. When a tile raises a maximum, the running
sums are rescaled online (``reverse_kl.py`` documents the algebra); the same rescaling merges a row's
column ranges (a second, small kernel) and later the shards of the tensor-parallel ranks, so forward
needs no separate max pass. The statistics and gradient are the ones of the torch path in ``reverse_kl.py``, which
is also the reference the tests compare these kernels with (on CPU through ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_V = 4096
"""Vocabulary columns per tile (fewer for narrower inputs). Measured on an H200 at T = 8192,
V = 151936 bf16 (tiles 1024-8192, 4-16 warps): 4096 columns with 4 warps for the statistics
(1.52 ms, 1.3x the two-read floor) and 8 for the gradient (1.83 ms, at the three-pass floor)."""


MIN_PROGRAMS = 8192
MAX_SPLITS = 16
"""The statistics of fewer than ``MIN_PROGRAMS`` rows split each row's columns over up to ``MAX_SPLITS``
programs, each a range of whole tiles (so 13 ranges of 3 tiles at Qwen3's 151,936 columns): with one
program per row, the short token chunks of the fused output layer (256 rows of Qwen3's vocabulary) ran
at 2.5x their two-read floor on an H200, in 13 ranges at 1.6x; at 8192 rows splitting gained nothing
(measured 2026-11-29, bench/RESULTS.md)."""


def _tile(vocab: int, block_columns: int | None) -> int:
    return block_columns or min(BLOCK_V, triton.next_power_of_2(max(vocab, 16)))


@triton.jit
def _local_statistics_kernel(
    x_ptr, y_ptr, out_ptr, x_row_stride, y_row_stride, n_rows, vocab, split_columns, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    end = tl.minimum((split + 1) * split_columns, vocab)
    m_x = -float("inf")
    m_y = -float("inf")
    z_x = 0.0
    z_y = 0.0
    w = 0.0
    for start in range(split * split_columns, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < end
        x = tl.load(x_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
        y = tl.load(y_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
        new_m_x = tl.maximum(m_x, tl.max(x, axis=0))
        new_m_y = tl.maximum(m_y, tl.max(y, axis=0))
        # Shift by 0 while a maximum is still -inf (all columns so far carry no mass).
        shift_x = tl.where(new_m_x == -float("inf"), 0.0, new_m_x)
        shift_y = tl.where(new_m_y == -float("inf"), 0.0, new_m_y)
        # Rescale the running sums to the new shifts; a sum of zero mass, or of mass that underflows
        # in the new shift (its w may be +inf), contributes exactly zero.
        alpha_x = tl.exp(m_x - shift_x)
        w = tl.where(z_x * alpha_x > 0, alpha_x * (w + ((m_x - shift_x) - (m_y - shift_y)) * z_x), 0.0)
        z_x = z_x * alpha_x
        z_y = z_y * tl.exp(m_y - shift_y)
        a = x - shift_x
        b = y - shift_y
        e_x = tl.exp(a)
        z_x += tl.sum(e_x, axis=0)
        z_y += tl.sum(tl.exp(b), axis=0)
        w += tl.sum(tl.where(e_x > 0, e_x * (a - b), 0.0), axis=0)
        m_x = new_m_x
        m_y = new_m_y
    out = out_ptr + split * 5 * n_rows
    tl.store(out + row, m_x)
    tl.store(out + n_rows + row, m_y)
    tl.store(out + 2 * n_rows + row, z_x)
    tl.store(out + 3 * n_rows + row, z_y)
    tl.store(out + 4 * n_rows + row, w)


@triton.jit
def _merge_splits_kernel(partial_ptr, out_ptr, n_rows, n_splits, SPLITS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """``[n_splits, 5, N]`` statistics of a row's column ranges to ``[5, N]``, as ``reverse_kl._rescaled_sums``
    (all ranges loaded at once: ``SPLITS`` >= ``n_splits``, a power of 2)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    splits = tl.arange(0, SPLITS)
    inside = (splits[:, None] < n_splits) & (rows[None, :] < n_rows)
    part = partial_ptr + splits[:, None] * 5 * n_rows + rows[None, :]
    mu_x = tl.load(part, mask=inside, other=-float("inf"))
    mu_y = tl.load(part + n_rows, mask=inside, other=-float("inf"))
    z_x = tl.load(part + 2 * n_rows, mask=inside, other=0.0)
    z_y = tl.load(part + 3 * n_rows, mask=inside, other=0.0)
    w = tl.load(part + 4 * n_rows, mask=inside, other=0.0)
    m_x = tl.max(mu_x, axis=0)
    m_y = tl.max(mu_y, axis=0)
    offset_x = tl.where(mu_x == -float("inf"), 0.0, mu_x) - tl.where(m_x == -float("inf"), 0.0, m_x)[None, :]
    offset_y = tl.where(mu_y == -float("inf"), 0.0, mu_y) - tl.where(m_y == -float("inf"), 0.0, m_y)[None, :]
    alpha_x = tl.exp(offset_x)
    # a range whose mass underflows in the row's shift contributes 0 (its w may be +inf); a nan (from a nan
    # logit) is kept, as in one range: "not <= 0" is true for it
    has_x = ~(alpha_x * z_x <= 0)
    row_z_x = tl.sum(tl.where(has_x, alpha_x * z_x, 0.0), axis=0)
    row_z_y = tl.sum(tl.where(~(z_y <= 0), tl.exp(offset_y) * z_y, 0.0), axis=0)
    row_w = tl.sum(tl.where(has_x, alpha_x * (w + (offset_x - offset_y) * z_x), 0.0), axis=0)
    stored = rows < n_rows
    tl.store(out_ptr + rows, m_x, mask=stored)
    tl.store(out_ptr + n_rows + rows, m_y, mask=stored)
    tl.store(out_ptr + 2 * n_rows + rows, row_z_x, mask=stored)
    tl.store(out_ptr + 3 * n_rows + rows, row_z_y, mask=stored)
    tl.store(out_ptr + 4 * n_rows + rows, row_w, mask=stored)


@triton.jit
def _reverse_kl_grad_kernel(
    s_ptr, t_ptr, grad_ptr, m_s_ptr, m_t_ptr, log_z_s_ptr, c_ptr, scale_ptr,
    s_row_stride, t_row_stride, grad_row_stride, vocab, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m_s = tl.load(m_s_ptr + row)
    m_t = tl.load(m_t_ptr + row)
    log_z_s = tl.load(log_z_s_ptr + row)
    c = tl.load(c_ptr + row)
    scale = tl.load(scale_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        a = tl.load(s_ptr + row * s_row_stride + cols, mask=inside, other=-float("inf")).to(tl.float32) - m_s
        b = tl.load(t_ptr + row * t_row_stride + cols, mask=inside, other=-float("inf")).to(tl.float32) - m_t
        p_s = tl.exp(a - log_z_s)
        grad = tl.where(p_s > 0, p_s * ((a - b) - c), 0.0) * scale
        tl.store(grad_ptr + row * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _check_tensors(*tensors: Tensor) -> None:
    for tensor in tensors:
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the Triton KL backend needs CUDA tensors (or TRITON_INTERPRET=1), got {tensor.device}")
        if tensor.dim() != 2 or tensor.stride(1) != 1:
            raise ValueError(f"Triton KL kernels need 2-D logits with contiguous columns, got strides {tensor.stride()}")


def local_statistics(x_logits: Tensor, y_logits: Tensor, block_columns: int | None = None, splits: int | None = None) -> Tensor:
    """``[5, N]`` fp32 rows ``(m_x, m_y, z_x, z_y, w)`` of this shard, shifted by its own maxima
    (a maximum of ``-inf`` shifts by 0); merged over ranks by ``reverse_kl.merge_statistics``.
    ``splits``: column ranges per row (default: enough for ``MIN_PROGRAMS`` programs), at most ``MAX_SPLITS`` and one per tile."""
    _check_tensors(x_logits, y_logits)
    n_rows, vocab = x_logits.shape
    out = torch.empty(5, n_rows, dtype=torch.float32, device=x_logits.device)
    if not n_rows:
        return out
    block = _tile(vocab, block_columns)
    tiles = max(1, triton.cdiv(vocab, block))
    wanted = max(1, MIN_PROGRAMS // n_rows) if splits is None else splits
    split_columns = triton.cdiv(tiles, min(wanted, MAX_SPLITS, tiles)) * block  # whole tiles per range
    splits = max(1, triton.cdiv(vocab, split_columns))
    partial = out if splits == 1 else torch.empty(splits, 5, n_rows, dtype=torch.float32, device=x_logits.device)
    _local_statistics_kernel[(n_rows, splits)](
        x_logits, y_logits, partial, x_logits.stride(0), y_logits.stride(0), n_rows, vocab, split_columns, BLOCK=block, num_warps=4
    )
    if splits > 1:
        _merge_splits_kernel[(triton.cdiv(n_rows, 64),)](partial, out, n_rows, splits, SPLITS=MAX_SPLITS, BLOCK_ROWS=64)
    return out


def reverse_kl_grad_into(
    grad: Tensor, student: Tensor, teacher: Tensor, m_s: Tensor, m_t: Tensor, log_z_s: Tensor, c: Tensor, scale: Tensor,
    block_columns: int | None = None,
) -> None:
    """``grad := p_s * ((s - m_s) - (t - m_t) - c) * scale`` row by row, zero where ``p_s == 0``."""
    _check_tensors(grad, student, teacher)
    n_rows, vocab = student.shape
    if n_rows:
        stats = [v.to(torch.float32).contiguous() for v in (m_s, m_t, log_z_s, c, scale)]
        _reverse_kl_grad_kernel[(n_rows,)](
            student, teacher, grad, *stats, student.stride(0), teacher.stride(0), grad.stride(0), vocab,
            BLOCK=_tile(vocab, block_columns), num_warps=8,
        )
