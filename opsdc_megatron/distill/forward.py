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

With `distill.fused_output_layer` the last stage stops at the final hidden states (the output layer
is bypassed for the call, see `DistillStage`) and `loss.fused_output_reverse_kl` applies the output
weight chunk by chunk inside the divergence, so the response logits never exist as one tensor.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.stage import DistillStage
from opsdc_megatron.loss import vocab_parallel_forward_kl, vocab_parallel_reverse_kl
from opsdc_megatron.loss.fused_output import fused_output_reverse_kl
from opsdc_megatron.models.qwen3.model import padding_vocab_slice

DIVERGENCES = {"reverse_kl": vocab_parallel_reverse_kl, "forward_kl": vocab_parallel_forward_kl}


def masked_sum_loss(response_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(divergence summed over the response tokens, their count, metrics), as megatron's
    per-token-loss schedules expect."""
    tokens = response_mask.sum().to(torch.int)
    total = torch.where(response_mask.bool(), per_token, 0.0).sum()
    return total, tokens, {"kl_sum": total.detach(), "response_tokens": tokens}


def make_forward_step(divergence: str, fused_output_layer: bool = False) -> Callable:
    if fused_output_layer and divergence != "reverse_kl":
        raise ValueError(f"the fused output layer computes the reverse KL only, not {divergence}")

    def forward_step(data_iterator: Iterator[MicroBatch], model: DistillStage):
        batch = next(data_iterator)
        output = model(batch)
        if not model.is_last_stage:
            return output, None
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if fused_output_layer:
            student_hidden, student_weight, teacher_hidden, teacher_weight = output
            # Identity forward, all-reduce of the hidden-state gradient over TP in backward: what
            # ColumnParallelLinear does for the unfused output layer.
            student_hidden = copy_to_tensor_model_parallel_region(student_hidden)
            per_token = fused_output_reverse_kl(
                student_hidden, student_weight, teacher_hidden, teacher_weight, tp_group,
                vocab_padding=padding_vocab_slice(model.vocab_size),
            ).view(batch.response_mask.shape)
        else:
            student_logits, teacher_logits = output
            per_token = DIVERGENCES[divergence](student_logits, teacher_logits, tp_group)
        return per_token, partial(masked_sum_loss, batch.response_mask)

    return forward_step
