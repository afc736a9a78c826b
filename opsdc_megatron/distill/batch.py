"""Aligned student/teacher micro-batches built from rollouts.

Student input: prompt + response. Teacher input: instruction + prompt + the same response. Only the
prefix differs, so the logits that predict response token j sit at (prefix length + j - 1) in each
sequence; both index tensors are built here and the loss compares exactly those positions.

Two layouts of a micro-batch's sequences, one per stream (student, teacher):

* padded: one row per sequence, right-padded. With causal attention, padding after the last real
  token changes nothing before it, so no attention mask is needed. Every attention backend runs it.
* packed: the sequences concatenated into ONE row with nothing between them, positions restarting
  at 0 for each sequence, and megatron's `PackedSeqParams` (``qkv_format="thd"``, cumulative
  sequence lengths) telling attention and RoPE where each sequence starts: no token is spent on
  padding, except where a row must reach a given length (FP8's multiple of 16 tokens, the
  interleaved schedule's one message shape): one padding sequence at its end. Needs an attention
  backend that takes packed sequences: Transformer Engine's or `models.sdpa_attention.SDPAttention`,
  not megatron's local DotProductAttention (`models.layer_spec.supports_packed_sequences`).

The logit index tensors are [sequences, response tokens] in both layouts and point into the row
that holds each sequence (its own row when padded, the single row when packed), so the loss code
reads both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from itertools import accumulate

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass(frozen=True)
class ScoredSequence:
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class MicroBatch:
    student_tokens: torch.Tensor
    """[rows, student length] int64: one right-padded row per sequence, or one packed row."""
    teacher_tokens: torch.Tensor
    student_positions: torch.Tensor
    """Like `student_tokens`: each token's position in its own sequence."""
    teacher_positions: torch.Tensor
    student_logit_index: torch.Tensor
    """[sequences, response tokens]: position in the sequence's row whose logits predict each response token."""
    teacher_logit_index: torch.Tensor
    response_mask: torch.Tensor
    """[sequences, response tokens] float32: 1 on real response tokens, 0 on padding."""
    student_packing: PackedSeqParams | None = None
    """Sequence boundaries of the packed student row (thd); None when padded."""
    teacher_packing: PackedSeqParams | None = None

    @property
    def response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy on `device`, sequence boundaries included (Transformer Engine reads them there)."""
        def packing_on(packing: PackedSeqParams | None) -> PackedSeqParams | None:
            if packing is None:
                return None
            cu_seqlens = packing.cu_seqlens_q.to(device)  # one tensor for q and kv: self-attention
            return replace(packing, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)

        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(
            self, **{name: tensor.to(device) for name, tensor in tensors.items()},
            student_packing=packing_on(self.student_packing), teacher_packing=packing_on(self.teacher_packing),
        )


def round_up(tokens: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `tokens`."""
    return -(-tokens // multiple) * multiple


def _stream(
    rows: list[list[int]], pad_id: int, width: int, packed: bool, token_multiple: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedSeqParams | None]:
    """(tokens, positions, where each sequence starts in its row, packing) of one stream.

    Padded to `width` tokens per row when that is longer, then to a multiple of `token_multiple`; a
    packed row ends with the padding as one more sequence, which attends only to itself and whose
    logits nothing reads."""
    lengths = [len(row) for row in rows]
    if packed:
        padding = round_up(max(width, sum(lengths)), token_multiple) - sum(lengths)
        segments = lengths + [padding] if padding else lengths
        boundaries = [0, *accumulate(segments)]
        cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        packing = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max(segments), max_seqlen_kv=max(segments),
        )
        tokens = torch.tensor([[token for row in rows for token in row] + [pad_id] * padding], dtype=torch.long)
        positions = torch.cat([torch.arange(length) for length in segments])[None, :]
        return tokens, positions, torch.tensor(boundaries[: len(rows)]), packing
    width = round_up(max(width, *lengths), token_multiple)
    tokens = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    return tokens, torch.arange(width).expand_as(tokens), torch.zeros(len(rows), dtype=torch.long), None


def make_micro_batch(
    sequences: list[ScoredSequence], pad_id: int, student_width: int = 0, teacher_width: int = 0, packed: bool = False,
    token_multiple: int = 1,
) -> MicroBatch:
    """One micro-batch: sequences right-padded to their longest, or with `packed` concatenated into one
    row per stream; each stream padded to its given width (tokens per row) when that is longer, and
    to a multiple of `token_multiple` (Transformer Engine's FP8 GEMMs need 16:
    `models.transformer_engine.fp8_token_multiple`)."""
    if any(not s.response_ids for s in sequences):
        raise ValueError("every rollout needs at least one response token")
    width = max(len(s.response_ids) for s in sequences)
    offsets = torch.arange(width)
    response_lengths = torch.tensor([len(s.response_ids) for s in sequences])
    mask = (offsets[None, :] < response_lengths[:, None]).float()
    streams = {}
    for side, prompts, stream_width in (
        ("student", [s.student_prompt_ids for s in sequences], student_width),
        ("teacher", [s.teacher_prompt_ids for s in sequences], teacher_width),
    ):
        rows = [prompt + s.response_ids for prompt, s in zip(prompts, sequences)]
        tokens, positions, starts, packing = _stream(rows, pad_id, stream_width, packed, token_multiple)
        index = (starts + torch.tensor([len(p) for p in prompts]) - 1)[:, None] + offsets[None, :]
        streams[side] = (tokens, positions, torch.where(mask.bool(), index, torch.zeros_like(index)), packing)
    (student_tokens, student_positions, student_index, student_packing) = streams["student"]
    (teacher_tokens, teacher_positions, teacher_index, teacher_packing) = streams["teacher"]
    return MicroBatch(
        student_tokens=student_tokens, teacher_tokens=teacher_tokens,
        student_positions=student_positions, teacher_positions=teacher_positions,
        student_logit_index=student_index, teacher_logit_index=teacher_index, response_mask=mask,
        student_packing=student_packing, teacher_packing=teacher_packing,
    )


def stream_widths(group: list[ScoredSequence], packed: bool, token_multiple: int = 1) -> tuple[int, int]:
    """Student and teacher tokens per row of a micro-batch of `group`, as `make_micro_batch` lays
    them out: summed when packed, the longest sequence when padded; rounded up to `token_multiple`."""
    student = [len(s.student_prompt_ids) + len(s.response_ids) for s in group]
    teacher = [len(s.teacher_prompt_ids) + len(s.response_ids) for s in group]
    widths = (sum(student), sum(teacher)) if packed else (max(student), max(teacher))
    return round_up(widths[0], token_multiple), round_up(widths[1], token_multiple)


def make_micro_batches(
    sequences: list[ScoredSequence], micro_batch_sequences: int, pad_id: int, same_shape: bool = False,
    token_multiple: int = 1,
) -> list[MicroBatch]:
    """Consecutive groups of `micro_batch_sequences`; the caller has checked divisibility.

    `same_shape` pads every micro-batch to the longest student and teacher sequence of all of them,
    for megatron's interleaved schedule: it exchanges each message's shape with batched p2p in an
    order that gloo (which pairs messages between two ranks in posting order) mismatches when the
    previous and next pipeline rank are the same process, so there all shapes must be equal.
    """
    widths = stream_widths(sequences, packed=False) if same_shape else (0, 0)
    return [
        make_micro_batch(sequences[start : start + micro_batch_sequences], pad_id, *widths, token_multiple=token_multiple)
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


def pack_micro_batches(
    sequences: list[ScoredSequence], micro_batch_tokens: int, pad_id: int, packed: bool = False,
    interleaved_pipeline_size: int = 0, token_multiple: int = 1,
) -> list[MicroBatch]:
    """Micro-batches of similar-length sequences, each within a token budget.

    Sequences are sorted by length and a micro-batch takes the next one while its student + teacher
    tokens stay within `micro_batch_tokens`: the real tokens when `packed` (one packed row per
    stream, see the module docstring), else sequences x (longest student + longest teacher
    sequence), padding included; each stream's tokens rounded up to a multiple of `token_multiple`
    (`make_micro_batch`). Sorting keeps the padding small; packed, longest first lets this one pass
    fill micro-batches close to the budget.

    `interleaved_pipeline_size` > 0 (megatron's interleaved schedule, packed only) gives what that
    schedule needs: every micro-batch sends one message shape between stages (its teacher row padded
    so that student + teacher tokens equal the step's largest micro-batch, still within the budget;
    see `make_micro_batches` for why), and their number is a multiple of the pipeline size and at
    least twice it: the micro-batches with the most tokens are split in two, and when no micro-batch
    has two sequences left to split, micro-batches of padding alone, with no response token, make
    up the number.

    Raises:
        ValueError: a sequence longer than the budget by itself; `interleaved_pipeline_size` without `packed`.
    """
    if interleaved_pipeline_size and not packed:
        raise ValueError(
            "the interleaved pipeline schedule with a token budget needs packed micro-batches "
            "(an attention backend that takes packed sequences: te or sdpa)"
        )

    def budget_tokens(group: list[ScoredSequence]) -> int:
        return (1 if packed else len(group)) * sum(stream_widths(group, packed, token_multiple))

    too_long = [budget_tokens([s]) for s in sequences if budget_tokens([s]) > micro_batch_tokens]
    if too_long:
        raise ValueError(
            f"train.micro_batch_tokens = {micro_batch_tokens} is smaller than a sequence's student + teacher "
            f"tokens ({max(too_long)})"
        )

    groups: list[list[ScoredSequence]] = []
    for sequence in sorted(sequences, key=stream_tokens, reverse=True):
        if groups and budget_tokens(groups[-1] + [sequence]) <= micro_batch_tokens:
            groups[-1].append(sequence)
        else:
            groups.append([sequence])
    if not interleaved_pipeline_size:
        return [make_micro_batch(group, pad_id, packed=packed, token_multiple=token_multiple) for group in groups]

    # At least two micro-batches per stage: with one, megatron's schedule runs all of the first stage's
    # in warm-up, and its exchanges between stages then deadlock on gloo (config.py refuses it too).
    target = round_up(max(len(groups), 2 * interleaved_pipeline_size), interleaved_pipeline_size)
    while len(groups) < target and any(len(group) > 1 for group in groups):
        largest = max((i for i, group in enumerate(groups) if len(group) > 1), key=lambda i: budget_tokens(groups[i]))
        group = groups.pop(largest)
        groups[largest:largest] = [group[0::2], group[1::2]]  # alternate: halves of similar tokens
    fillers = target - len(groups)
    groups += [[ScoredSequence([pad_id], [pad_id], [pad_id])]] * fillers
    message_tokens = max(budget_tokens(group) for group in groups)
    micro_batches = []
    for group in groups:
        student_tokens = stream_widths(group, packed, token_multiple)[0]
        micro_batches.append(make_micro_batch(
            group, pad_id, teacher_width=message_tokens - student_tokens, packed=True, token_multiple=token_multiple,
        ))
    for filler in micro_batches[len(micro_batches) - fillers :]:
        filler.response_mask.zero_()
    return micro_batches


def micro_batches_for_rank(
    sequences: list[ScoredSequence], dp_rank: int, dp_size: int, micro_batch_sequences: int,
    micro_batch_tokens: int, pad_id: int, packed: bool = False, interleaved_pipeline_size: int = 0,
    token_multiple: int = 1,
) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches from the step's sequences (all ranks).

    With a token budget (`micro_batch_tokens` > 0), sequences are balanced over ranks by tokens and
    grouped by length (`pack_micro_batches`), each micro-batch packed into one row per stream when
    `packed` (the attention backend takes packed sequences: `layer_spec.supports_packed_sequences`),
    else right-padded; without a budget each rank takes an equal consecutive share in padded groups
    of `micro_batch_sequences` (`packed` does not apply). `interleaved_pipeline_size` > 0: the
    interleaved schedule runs on that many pipeline ranks (micro-batches of one message shape).
    `token_multiple`: each stream's tokens per micro-batch a multiple of it (FP8).
    With `distill.loss_normalization=step_tokens` the loss is a per-token mean over the whole step
    (distill/forward.py), so neither the split nor the layout changes it; with `micro_batch` it is the
    mean over these micro-batches, whatever split them (the budget, the interleaved schedule's splits).
    """
    if micro_batch_tokens:
        mine = [sequences[i] for i in balance_over_ranks(sequences, dp_size)[dp_rank]]
        return pack_micro_batches(mine, micro_batch_tokens, pad_id, packed, interleaved_pipeline_size, token_multiple)
    per_rank = len(sequences) // dp_size
    mine = sequences[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return make_micro_batches(mine, micro_batch_sequences, pad_id, bool(interleaved_pipeline_size), token_multiple)
