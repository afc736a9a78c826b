"""One micro-batch through teacher and student, to the per-token divergence on response positions.

This is the `forward_step_func` handed to megatron-core's forward-backward schedule. Logits stay
vocabulary-sharded ([sequences, response tokens, V/TP] on each tensor-parallel rank); the
vocabulary padding columns are set to -inf so they carry no probability mass.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state

from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.teacher import TeacherSnapshot
from opsdc_megatron.loss import vocab_parallel_forward_kl, vocab_parallel_reverse_kl
from opsdc_megatron.models.qwen3.model import padding_vocab_slice

DIVERGENCES = {"reverse_kl": vocab_parallel_reverse_kl, "forward_kl": vocab_parallel_forward_kl}


def response_logits(model: torch.nn.Module, tokens: torch.Tensor, logit_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's vocabulary shard of the logits that predict each response token."""
    logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    rows = torch.arange(tokens.shape[0])[:, None]
    picked = logits[rows, logit_index]
    picked[..., padding_vocab_slice(vocab_size)] = float("-inf")
    return picked


def masked_mean_loss(response_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The paper's normalization: sum over the micro-batch's response tokens / their count."""
    tokens = response_mask.sum()
    total = torch.where(response_mask.bool(), per_token, 0.0).sum()
    loss = total / tokens
    return loss, {"kl_sum": total.detach(), "response_tokens": tokens.detach()}


def make_forward_step(teacher: TeacherSnapshot, divergence: str, vocab_size: int) -> Callable:
    divergence_fn = DIVERGENCES[divergence]

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        with torch.no_grad():
            teacher_logits = response_logits(teacher.model, batch.teacher_tokens, batch.teacher_logit_index, vocab_size)
        student_logits = response_logits(model, batch.student_tokens, batch.student_logit_index, vocab_size)
        per_token = divergence_fn(student_logits, teacher_logits, parallel_state.get_tensor_model_parallel_group())
        return per_token, partial(masked_mean_loss, batch.response_mask)

    return forward_step
