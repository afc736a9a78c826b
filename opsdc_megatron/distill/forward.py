"""One micro-batch through teacher and student, to the per-token divergence on response positions.

`make_forward_step` builds the `forward_step_func` handed to megatron-core's forward-backward
schedules; the model it receives is a `DistillStage` (student and teacher chunks together). Logits
stay vocabulary-sharded ([sequences, response tokens, V/TP] on each tensor-parallel rank).

Loss normalization (`distill.loss_normalization`): the loss function returns a sum and its weight;
megatron (``calculate_per_token_loss``) sums both over micro-batches and data-parallel ranks and
divides the gradient once by the total weight.
- step_tokens (default): the divergence summed over a micro-batch's response tokens, weighted by their
  count: the loss is the mean per-token divergence over every response token of the optimizer step,
  whatever the split into micro-batches, data-parallel ranks or packed sequences.
- micro_batch: each micro-batch's mean, weight 1: the mean of the micro-batch means, the paper's
  (verl's "token-mean"). A token weighs 1 / (response tokens of its micro-batch), so the objective
  changes with `train.micro_batch_prompts`, and with a token budget (`train.micro_batch_tokens`, whose
  micro-batches hold as many rollouts as fit, split further for the interleaved pipeline schedule, so
  then with the pipeline size and the data-parallel size too, as rollouts are regrouped per rank); without
  a token budget not with the data-parallel size (consecutive groups of prompts).
Both agree when every micro-batch holds the same number of response tokens.

With `distill.fused_output_layer` the last stage stops at the final hidden states (the output layer
is bypassed for the call, see `DistillStage`) and `loss.fused_output_reverse_kl` applies the output
weight chunk by chunk inside the divergence, so the response logits never exist as one tensor. It
takes the tokens' weights in the objective (`loss_weights`) and computes the gradients in forward,
the output weight's straight into megatron DDP's ``main_grad``.
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


def loss_weights(response_mask: torch.Tensor, per_micro_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each token's weight in the micro-batch's objective: 1, or 1 / response tokens with
    `per_micro_batch`, 0 off the response; the objective's weight: response tokens, or 1; the response
    tokens). A micro-batch without response tokens (a pipeline schedule's filler) weighs 0 either way."""
    tokens = response_mask.sum().to(torch.int)
    if per_micro_batch:
        return response_mask / tokens.clamp(min=1), (tokens > 0).to(torch.int), tokens
    return response_mask.to(torch.float32), tokens, tokens


def masked_loss(
    response_mask: torch.Tensor, per_token: torch.Tensor, per_micro_batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the divergence summed over the response tokens or, `per_micro_batch`, their mean; its weight;
    metrics), as megatron's per-token-loss schedules expect."""
    weights, weight, tokens = loss_weights(response_mask, per_micro_batch)
    objective = torch.where(weights != 0, per_token * weights, 0.0).sum()
    return weighted_loss(weight, tokens, objective)


def weighted_loss(weight: torch.Tensor, tokens: torch.Tensor, objective: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The loss function's result for an objective already summed with `loss_weights`."""
    return objective, weight, {"objective": objective.detach(), "weight": weight, "response_tokens": tokens}


def make_forward_step(divergence: str, fused_output_layer: bool = False, loss_normalization: str = "step_tokens") -> Callable:
    if fused_output_layer and divergence != "reverse_kl":
        raise ValueError(f"the fused output layer computes the reverse KL only, not {divergence}")
    per_micro_batch = loss_normalization == "micro_batch"

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
            weights, weight, tokens = loss_weights(batch.response_mask, per_micro_batch)
            objective = fused_output_reverse_kl(
                student_hidden, student_weight, teacher_hidden, teacher_weight, weights.view(-1), tp_group,
                vocab_padding=padding_vocab_slice(model.vocab_size),
            ).loss
            return objective, partial(weighted_loss, weight, tokens)
        student_logits, teacher_logits = output
        # The logits are this step's own (`response_logits`), saved by no other node: their storage
        # takes the gradient, one logits-sized buffer less at the backward's peak.
        per_token = DIVERGENCES[divergence](student_logits, teacher_logits, tp_group, grad_in_place=True)
        return per_token, partial(masked_loss, batch.response_mask, per_micro_batch=per_micro_batch)

    return forward_step
