"""One micro-batch through teacher and student, to the per-token divergence on response positions.

`make_forward_step` builds the `forward_step_func` handed to megatron-core's forward-backward
schedules; the model it receives is a `DistillStage` (student and teacher chunks together). Logits
stay vocabulary-sharded ([sequences, response tokens, V/TP] on each tensor-parallel rank).

Loss normalization: the divergence is summed over the response tokens of the micro-batch and
returned with their count; megatron (``calculate_per_token_loss``) sums these over micro-batches and
data-parallel ranks and divides the gradient once by the step's total response tokens. The loss is
thus the mean per-token divergence over every response token of the optimizer step, whatever the
split into micro-batches, data-parallel ranks or packed sequences. The paper (and verl's
"token-mean") divides each micro-batch by its own token count and averages over micro-batches,
which weights a token by 1 / (tokens of its micro-batch): it changes with the micro-batch size, the
data-parallel size and how sequences are packed, so it cannot stay the same objective across
layouts. Both agree when every micro-batch holds the same number of response tokens.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state

from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.stage import DistillStage
from opsdc_megatron.loss import vocab_parallel_forward_kl, vocab_parallel_reverse_kl

DIVERGENCES = {"reverse_kl": vocab_parallel_reverse_kl, "forward_kl": vocab_parallel_forward_kl}


def masked_sum_loss(response_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(divergence summed over the response tokens, their count, metrics), as megatron's
    per-token-loss schedules expect."""
    tokens = response_mask.sum().to(torch.int)
    total = torch.where(response_mask.bool(), per_token, 0.0).sum()
    return total, tokens, {"kl_sum": total.detach(), "response_tokens": tokens}


def make_forward_step(divergence: str) -> Callable:
    divergence_fn = DIVERGENCES[divergence]

    def forward_step(data_iterator: Iterator[MicroBatch], model: DistillStage):
        batch = next(data_iterator)
        output = model(batch)
        if not model.is_last_stage:
            return output, None
        student_logits, teacher_logits = output
        per_token = divergence_fn(student_logits, teacher_logits, parallel_state.get_tensor_model_parallel_group())
        return per_token, partial(masked_sum_loss, batch.response_mask)

    return forward_step
