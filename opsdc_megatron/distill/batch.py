"""Aligned student/teacher micro-batches built from rollouts.

Student input: prompt + response. Teacher input: instruction + prompt + the same response. Only the
prefix differs, so the logits that predict response token j sit at (prefix length + j - 1) in each
sequence; both index tensors are built here and the loss compares exactly those positions.
Sequences are right-padded: with causal attention, padding after the last real token changes
nothing before it, so no attention mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoredSequence:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class MicroBatch:
    student_tokens: torch.Tensor
    """[sequences, student length] int64, right-padded."""
    teacher_tokens: torch.Tensor
    student_logit_index: torch.Tensor
    """[sequences, response tokens]: student position whose logits predict each response token."""
    teacher_logit_index: torch.Tensor
    response_mask: torch.Tensor
    """[sequences, response tokens] float32: 1 on real response tokens, 0 on padding."""

    @property
    def response_tokens(self) -> int:
        return int(self.response_mask.sum().item())


def _pad(rows: list[list[int]], pad_id: int, width: int = 0) -> torch.Tensor:
    width = max(width, *(len(row) for row in rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)


def make_micro_batch(sequences: list[ScoredSequence], pad_id: int, student_width: int = 0, teacher_width: int = 0) -> MicroBatch:
    """Sequences right-padded to their longest, or to the given widths when those are longer."""
    if any(not s.response_ids for s in sequences):
        raise ValueError("every rollout needs at least one response token")
    width = max(len(s.response_ids) for s in sequences)
    offsets = torch.arange(width)
    response_lengths = torch.tensor([len(s.response_ids) for s in sequences])
    mask = (offsets[None, :] < response_lengths[:, None]).float()

    def logit_index(prompt_lengths: list[int]) -> torch.Tensor:
        index = torch.tensor(prompt_lengths)[:, None] - 1 + offsets[None, :]
        return torch.where(mask.bool(), index, torch.zeros_like(index))

    return MicroBatch(
        student_tokens=_pad([s.student_prompt_ids + s.response_ids for s in sequences], pad_id, student_width),
        teacher_tokens=_pad([s.teacher_prompt_ids + s.response_ids for s in sequences], pad_id, teacher_width),
        student_logit_index=logit_index([len(s.student_prompt_ids) for s in sequences]),
        teacher_logit_index=logit_index([len(s.teacher_prompt_ids) for s in sequences]),
        response_mask=mask,
    )


def make_micro_batches(
    sequences: list[ScoredSequence], micro_batch_sequences: int, pad_id: int, same_shape: bool = False
) -> list[MicroBatch]:
    """Consecutive groups of `micro_batch_sequences`; the caller has checked divisibility.

    `same_shape` pads every micro-batch to the longest student and teacher sequence of all of them,
    for megatron's interleaved schedule: it exchanges each message's shape with batched p2p in an
    order that gloo (which pairs messages between two ranks in posting order) mismatches when the
    previous and next pipeline rank are the same process, so there all shapes must be equal.
    """
    widths = (0, 0)
    if same_shape:
        widths = (
            max(len(s.student_prompt_ids) + len(s.response_ids) for s in sequences),
            max(len(s.teacher_prompt_ids) + len(s.response_ids) for s in sequences),
        )
    return [
        make_micro_batch(sequences[start : start + micro_batch_sequences], pad_id, *widths)
        for start in range(0, len(sequences), micro_batch_sequences)
    ]
