"""Student and teacher see the same response tokens at aligned positions; the teacher snapshot's cadence."""

import pytest
import torch

from opsdc_megatron.distill.batch import (
    ScoredSequence,
    balance_over_ranks,
    make_micro_batches,
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
