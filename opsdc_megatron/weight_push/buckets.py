"""Grouping the exported Hugging Face state dict into buckets of bounded size for the push.

A bucket holds tensors of one dtype (a flattened bucket is one tensor), in state-dict order, up to
`bucket_bytes`; a tensor larger than that travels alone. Bounded buckets keep the extra memory
of a push (the flattened copy, the shared-memory file, the broadcast buffer) at one bucket, and
amortise the per-request overhead, the trade-off slime measured (23 s -> 8 s per update with 512 MiB).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

DEFAULT_BUCKET_BYTES = 512 * 1024**2


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def buckets(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yields lists of (Hugging Face name, tensor), each of one dtype and at most `bucket_bytes` (or one tensor)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    current: list[tuple[str, torch.Tensor]] = []
    current_bytes = 0
    for name, tensor in state_dict.items():
        size = tensor_bytes(tensor)
        if current and (current_bytes + size > bucket_bytes or tensor.dtype != current[0][1].dtype):
            yield current
            current, current_bytes = [], 0
        current.append((name, tensor))
        current_bytes += size
    if current:
        yield current
