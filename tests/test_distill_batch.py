"""Student and teacher see the same response tokens at aligned positions; the teacher snapshot's cadence."""

import pytest
import torch

from opsdc_megatron.distill.batch import (
    ScoredSequence,
    balance_over_ranks,
    make_micro_batch,
    make_micro_batches,
    micro_batches_for_rank,
    pack_micro_batches,
    stream_tokens,
)
from opsdc_megatron.distill.teacher import TeacherSnapshot

PAD = 0


def test_logit_index_points_at_the_token_before_each_response_token():
    sequences = [
        ScoredSequence([5, 6], [9, 9, 9, 5, 6], [11, 12, 13]),
        ScoredSequence([5, 6, 7, 8], [9, 9, 9, 5, 6, 7, 8], [14]),
        ScoredSequence([5], [9, 9, 9, 5], [15, 16]),
        ScoredSequence([5, 7], [9, 9, 9, 5, 7], [17, 18, 19, 20]),
    ]
    batches = make_micro_batches(sequences, 2, PAD)
    assert len(batches) == 2
    for batch, group in zip(batches, (sequences[:2], sequences[2:])):
        for row, sequence in enumerate(group):
            length = len(sequence.response_ids)
            assert batch.response_mask[row].sum() == length
            for side, tokens, index in (
                ("student", batch.student_tokens, batch.student_logit_index),
                ("teacher", batch.teacher_tokens, batch.teacher_logit_index),
            ):
                predicted = tokens[row, index[row, :length] + 1].tolist()
                assert predicted == sequence.response_ids, side
        assert batch.response_tokens == sum(len(s.response_ids) for s in group)


def test_teacher_refresh_cadence():
    student = torch.nn.ModuleList([torch.nn.Linear(3, 3)])
    teacher = TeacherSnapshot(torch.nn.ModuleList([torch.nn.Linear(3, 3)]), refresh_every=3)
    teacher.copy_from(student)
    assert torch.equal(teacher.model[0].weight, student[0].weight) and not teacher.model[0].weight.requires_grad
    refreshed = []
    for _ in range(7):
        with torch.no_grad():
            student[0].weight.add_(1.0)
        refreshed.append(teacher.after_optimizer_step(student))
        assert torch.equal(teacher.model[0].weight, student[0].weight) == refreshed[-1]
    assert refreshed == [False, False, True, False, False, True, False]
    assert teacher.age_steps == 1


def test_frozen_teacher_never_refreshes():
    student = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    teacher = TeacherSnapshot(torch.nn.ModuleList([torch.nn.Linear(2, 2)]), refresh_every=0)
    teacher.copy_from(student)
    initial = teacher.model[0].weight.clone()
    for _ in range(5):
        with torch.no_grad():
            student[0].weight.add_(1.0)
        assert not teacher.after_optimizer_step(student)
    assert torch.equal(teacher.model[0].weight, initial) and teacher.age_steps == 5


def varied_sequences(count):
    return [ScoredSequence([5] * (1 + i % 4), [9, 9, 9] + [5] * (1 + i % 4), [11] * (1 + (7 * i) % 9)) for i in range(count)]


def test_balance_over_ranks_evens_tokens_and_covers_every_sequence():
    sequences = varied_sequences(10)
    assignment = balance_over_ranks(sequences, 3)
    assert sorted(i for rank in assignment for i in rank) == list(range(10))
    totals = [sum(stream_tokens(sequences[i]) for i in rank) for rank in assignment]
    assert max(totals) - min(totals) <= max(stream_tokens(s) for s in sequences)
    assert balance_over_ranks(sequences, 3) == assignment, "every rank must compute the same assignment"


def test_pack_micro_batches_keeps_the_budget_and_every_token():
    sequences = varied_sequences(10)
    budget = 60
    batches = pack_micro_batches(sequences, budget, PAD)
    assert all(b.student_tokens.numel() + b.teacher_tokens.numel() <= budget for b in batches)
    assert sum(b.response_tokens for b in batches) == sum(len(s.response_ids) for s in sequences)
    assert len(batches) < len(sequences), "several sequences share a micro-batch"
    with pytest.raises(ValueError, match="train.micro_batch_tokens = 10 is smaller"):
        pack_micro_batches(sequences, 10, PAD)


def test_packed_layout_one_row_per_stream():
    """cu_seqlens, positions restarting per sequence, logit indices into the packed row: each picks
    the token before its response token, in both streams."""
    sequences = [
        ScoredSequence([5, 6], [9, 9, 9, 5, 6], [11, 12, 13]),
        ScoredSequence([5, 6, 7, 8], [9, 9, 9, 5, 6, 7, 8], [14]),
        ScoredSequence([5], [9, 9, 9, 5], [15, 16]),
    ]
    batch = make_micro_batch(sequences, PAD, packed=True)
    student_lengths, teacher_lengths = [5, 5, 3], [8, 8, 6]
    for side, lengths, prompts in (
        ("student", student_lengths, [s.student_prompt_ids for s in sequences]),
        ("teacher", teacher_lengths, [s.teacher_prompt_ids for s in sequences]),
    ):
        tokens, positions = getattr(batch, f"{side}_tokens"), getattr(batch, f"{side}_positions")
        packing, index = getattr(batch, f"{side}_packing"), getattr(batch, f"{side}_logit_index")
        assert tokens.tolist() == [[t for p, s in zip(prompts, sequences) for t in p + s.response_ids]], side
        assert positions.tolist() == [[i for length in lengths for i in range(length)]], side
        assert packing.qkv_format == "thd" and packing.cu_seqlens_q.dtype == torch.int32
        assert packing.cu_seqlens_q.tolist() == packing.cu_seqlens_kv.tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths)]
        assert packing.max_seqlen_q == packing.max_seqlen_kv == max(lengths)
        assert index.shape == batch.response_mask.shape == (3, 3)
        for row, sequence in enumerate(sequences):
            length = len(sequence.response_ids)
            assert tokens[0, index[row, :length] + 1].tolist() == sequence.response_ids, (side, row)
            assert (index[row, length:] == 0).all()
    assert batch.response_tokens == 6


def test_packed_micro_batch_of_one_sequence_is_the_padded_one():
    sequence = ScoredSequence([5, 6, 7], [9, 9, 5, 6, 7], [11, 12])
    packed, padded = make_micro_batch([sequence], PAD, packed=True), make_micro_batch([sequence], PAD)
    assert padded.student_packing is None and padded.teacher_packing is None
    for name in ("student_tokens", "teacher_tokens", "student_positions", "teacher_positions",
                 "student_logit_index", "teacher_logit_index", "response_mask"):
        assert torch.equal(getattr(packed, name), getattr(padded, name)), name
    assert packed.student_packing.cu_seqlens_q.tolist() == [0, 5] and packed.student_packing.max_seqlen_q == 5
    assert packed.teacher_packing.cu_seqlens_q.tolist() == [0, 7]
    moved = packed.to("cpu")
    assert torch.equal(moved.student_packing.cu_seqlens_q, packed.student_packing.cu_seqlens_q)
    assert moved.student_packing.cu_seqlens_kv is moved.student_packing.cu_seqlens_q


def test_packed_budget_counts_real_tokens_up_to_the_edge():
    """Packed, a micro-batch holds exactly the budget; padded, the same sequences count their padding."""
    short, long = ScoredSequence([5], [9, 5], [11]), ScoredSequence([5, 6, 7], [9, 5, 6, 7], [11, 12, 13])
    both = stream_tokens(short) + stream_tokens(long)  # 5 + 13
    assert [len(b.response_mask) for b in pack_micro_batches([short, long], both, PAD, packed=True)] == [2]
    assert [len(b.response_mask) for b in pack_micro_batches([short, long], both - 1, PAD, packed=True)] == [1, 1]
    assert [len(b.response_mask) for b in pack_micro_batches([short, long], both, PAD)] == [1, 1], "padded: 2 x 13 > 18"
    batches = pack_micro_batches(varied_sequences(10), 60, PAD, packed=True)
    assert all(b.student_tokens.shape[0] == 1 and b.student_tokens.numel() + b.teacher_tokens.numel() <= 60 for b in batches)
    real_tokens = sum(stream_tokens(s) for s in varied_sequences(10))
    assert sum(b.student_tokens.numel() + b.teacher_tokens.numel() for b in batches) == real_tokens, "no padding"
    padded = pack_micro_batches(varied_sequences(10), 60, PAD)
    assert sum(b.student_tokens.numel() + b.teacher_tokens.numel() for b in padded) > real_tokens
    with pytest.raises(ValueError, match="train.micro_batch_tokens = 10 is smaller"):
        pack_micro_batches(varied_sequences(10), 10, PAD, packed=True)


def test_packed_rank_split_covers_every_response_token():
    sequences = varied_sequences(9)
    per_rank = [micro_batches_for_rank(sequences, rank, 2, 1, 60, PAD, packed=True) for rank in range(2)]
    assert sum(b.response_tokens for batches in per_rank for b in batches) == sum(len(s.response_ids) for s in sequences)
    assert all(b.student_packing is not None for batches in per_rank for b in batches)
    assert all(b.student_packing is None for b in micro_batches_for_rank(sequences[:8], 0, 2, 2, 0, PAD, packed=True)), \
        "no token budget: padded groups of micro_batch_prompts"


def response_tokens_read(batch, stream: str = "student") -> list[list[int]]:
    """The response tokens each sequence's logit index in `stream` predicts, read back from its packed row."""
    tokens, index = getattr(batch, f"{stream}_tokens"), getattr(batch, f"{stream}_logit_index")
    return [
        tokens[0, index[row, : int(batch.response_mask[row].sum())] + 1].tolist()
        for row in range(batch.response_mask.shape[0])
    ]


@pytest.mark.parametrize("pipeline_size", [2, 3, 4])
def test_interleaved_token_budget_micro_batches_share_one_message_shape(pipeline_size):
    """What megatron's interleaved schedule needs: a multiple of the pipeline size (at least twice it), one
    [tokens, rows] message."""
    sequences = varied_sequences(7)
    plain = pack_micro_batches(sequences, 60, PAD, packed=True)
    batches = pack_micro_batches(sequences, 60, PAD, packed=True, interleaved_pipeline_size=pipeline_size)
    assert len(batches) % pipeline_size == 0 and len(batches) >= max(len(plain), 2 * pipeline_size)
    messages = {(b.student_tokens.shape[1] + b.teacher_tokens.shape[1], b.student_tokens.shape[0]) for b in batches}
    assert len(messages) == 1 and next(iter(messages))[0] <= 60, messages
    assert any(len(b.teacher_packing.cu_seqlens_q) == len(b.response_mask) + 1 for b in batches), \
        "padded to the largest micro-batch, which has no padding segment"
    for stream in ("student", "teacher"):  # the teacher rows are padded to the message width too
        read = sorted(r for b in batches for r in response_tokens_read(b, stream) if r)
        assert read == sorted(s.response_ids for s in sequences), f"{stream}: every response once, at the right positions"
    for batch in batches:
        teacher = batch.teacher_packing.cu_seqlens_q.tolist()
        assert teacher[-1] == batch.teacher_tokens.shape[1] and batch.teacher_packing.max_seqlen_q == max(
            b - a for a, b in zip(teacher, teacher[1:])
        )
        assert batch.teacher_positions.shape == batch.teacher_tokens.shape


def test_interleaved_token_budget_splits_before_it_fills():
    """Larger micro-batches are split first; padding-only micro-batches (no response token) only when
    every micro-batch holds one sequence."""
    sequences = varied_sequences(5)
    assert len(pack_micro_batches(sequences, 1000, PAD, packed=True)) == 1
    split = pack_micro_batches(sequences, 1000, PAD, packed=True, interleaved_pipeline_size=2)
    assert [len(b.response_mask) for b in split] and all(b.response_tokens > 0 for b in split)
    assert sorted(len(b.response_mask) for b in split) == [1, 1, 1, 2]
    filled = pack_micro_batches(sequences[:3], 1000, PAD, packed=True, interleaved_pipeline_size=2)
    assert [b.response_tokens > 0 for b in filled] == [True, True, True, False]
    filler = next(b for b in filled if b.response_tokens == 0)
    assert (filler.student_tokens == PAD).all() and (filler.teacher_tokens == PAD).all()
    with pytest.raises(ValueError, match="needs packed micro-batches"):
        pack_micro_batches(sequences, 1000, PAD, interleaved_pipeline_size=2)


@pytest.mark.parametrize("packed", [False, True])
def test_token_multiple_pads_every_stream_and_keeps_the_responses(packed):
    """FP8 (Transformer Engine's GEMMs need tokens divisible by 16): every stream of every micro-batch
    holds a multiple of 16 tokens, the responses are read back unchanged, the budget still holds."""
    sequences = varied_sequences(9)
    for interleaved in ([0, 2] if packed else [0]):
        batches = pack_micro_batches(sequences, 96, PAD, packed, interleaved_pipeline_size=interleaved, token_multiple=16)
        for batch in batches:
            for tokens, positions in ((batch.student_tokens, batch.student_positions), (batch.teacher_tokens, batch.teacher_positions)):
                assert tokens.numel() % 16 == 0 and positions.shape == tokens.shape
            assert batch.student_tokens.numel() + batch.teacher_tokens.numel() <= 96
        assert sum(b.response_tokens for b in batches) == sum(len(s.response_ids) for s in sequences)
    one = make_micro_batch(sequences[:3], PAD, packed=packed, token_multiple=16)
    unaligned = make_micro_batch(sequences[:3], PAD, packed=packed)
    assert one.student_tokens.shape[1] == -(-unaligned.student_tokens.shape[1] // 16) * 16
    for side in ("student", "teacher"):
        aligned_index, index = getattr(one, f"{side}_logit_index"), getattr(unaligned, f"{side}_logit_index")
        assert torch.equal(aligned_index, index), "padding only after the sequences"
        width = getattr(unaligned, f"{side}_tokens").shape[1]
        assert torch.equal(getattr(one, f"{side}_tokens")[:, :width], getattr(unaligned, f"{side}_tokens"))
    if packed:
        boundaries = one.teacher_packing.cu_seqlens_q.tolist()
        assert boundaries[:-1] == unaligned.teacher_packing.cu_seqlens_q.tolist()
        assert boundaries[-1] == one.teacher_tokens.shape[1], "the padding is one more sequence"
