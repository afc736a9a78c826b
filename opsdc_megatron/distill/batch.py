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


def stream_tokens(sequence: ScoredSequence) -> int:
    """Tokens one sequence puts through the model: its student and its teacher input."""
    return len(sequence.student_prompt_ids) + len(sequence.teacher_prompt_ids) + 2 * len(sequence.response_ids)


def balance_over_ranks(sequences: list[ScoredSequence], ranks: int) -> list[list[int]]:
    """Indices of the sequences each data-parallel rank scores, with similar token totals.

    Longest first, each to the rank with the fewest tokens so far (ties: the lowest rank), so every
    rank gets at least one sequence when there are at least `ranks`. Deterministic: every rank
    computes the same assignment.
    """
    totals = [0] * ranks
    assignment: list[list[int]] = [[] for _ in range(ranks)]
    for index in sorted(range(len(sequences)), key=lambda i: -stream_tokens(sequences[i])):
        rank = min(range(ranks), key=lambda r: (totals[r], r))
        assignment[rank].append(index)
        totals[rank] += stream_tokens(sequences[index])
    return [sorted(indices) for indices in assignment]


def pack_micro_batches(sequences: list[ScoredSequence], micro_batch_tokens: int, pad_id: int) -> list[MicroBatch]:
    """Micro-batches of similar-length sequences, each within a token budget, padding included.

    Sequences are sorted by length and a micro-batch takes the next one while (sequences x longest
    student + teacher stream) stays within `micro_batch_tokens`. The attention here (megatron's
    local spec) needs right padding; packing several sequences into one row needs a backend with
    packed-sequence support (Transformer Engine / flash attention with THD layout).

    Raises:
        ValueError: a sequence longer than the budget by itself.
    """
    too_long = [stream_tokens(s) for s in sequences if stream_tokens(s) > micro_batch_tokens]
    if too_long:
        raise ValueError(
            f"train.micro_batch_tokens = {micro_batch_tokens} is smaller than a sequence's student + teacher "
            f"tokens ({max(too_long)})"
        )
    def padded_tokens(group: list[ScoredSequence]) -> int:
        student = max(len(s.student_prompt_ids) + len(s.response_ids) for s in group)
        teacher = max(len(s.teacher_prompt_ids) + len(s.response_ids) for s in group)
        return len(group) * (student + teacher)

    groups: list[list[ScoredSequence]] = []
    for sequence in sorted(sequences, key=stream_tokens, reverse=True):
        if groups and padded_tokens(groups[-1] + [sequence]) <= micro_batch_tokens:
            groups[-1].append(sequence)
        else:
            groups.append([sequence])
    return [make_micro_batch(group, pad_id) for group in groups]


def micro_batches_for_rank(
    sequences: list[ScoredSequence], dp_rank: int, dp_size: int, micro_batch_sequences: int,
    micro_batch_tokens: int, pad_id: int, same_shape: bool = False,
) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches from the step's sequences (all ranks).

    With a token budget (`micro_batch_tokens` > 0), sequences are balanced over ranks by tokens and
    packed by length (`pack_micro_batches`); otherwise each rank takes an equal consecutive share in
    groups of `micro_batch_sequences`. The loss is a per-token mean over the whole step
    (distill/forward.py), so the split changes nothing but speed.
    """
    if micro_batch_tokens:
        mine = [sequences[i] for i in balance_over_ranks(sequences, dp_size)[dp_rank]]
        return pack_micro_batches(mine, micro_batch_tokens, pad_id)
    per_rank = len(sequences) // dp_size
    mine = sequences[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return make_micro_batches(mine, micro_batch_sequences, pad_id, same_shape)
