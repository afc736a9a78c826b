"""One micro-batch through teacher and student, to the per-token divergence on response positions.

This is the `forward_step_func` handed to megatron-core's forward-backward schedule. Logits stay
vocabulary-sharded ([sequences, response tokens, V/TP] on each tensor-parallel rank); the
vocabulary padding columns are set to -inf so they carry no probability mass.

With `distill.fused_output_layer` the models stop at their final hidden states (the output layer
is bypassed for the call) and `loss.fused_output_reverse_kl` applies the output weight chunk by
chunk inside the divergence, so the response logits never exist as one tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.teacher import TeacherSnapshot
from opsdc_megatron.loss import vocab_parallel_forward_kl, vocab_parallel_reverse_kl
from opsdc_megatron.loss.fused_output import fused_output_reverse_kl
from opsdc_megatron.models.qwen3.model import padding_vocab_slice

DIVERGENCES = {"reverse_kl": vocab_parallel_reverse_kl, "forward_kl": vocab_parallel_forward_kl}


def response_logits(model: torch.nn.Module, tokens: torch.Tensor, logit_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's vocabulary shard of the logits that predict each response token."""
    logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    rows = torch.arange(tokens.shape[0])[:, None]
    picked = logits[rows, logit_index]
    picked[..., padding_vocab_slice(vocab_size)] = float("-inf")
    return picked


def _gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while not hasattr(model, "output_layer"):
        model = model.module
    return model


@contextmanager
def _output_layer_bypassed(gpt: torch.nn.Module) -> Iterator[None]:
    """Within the block, GPTModel.forward returns its final hidden states [b, s, H] as "logits"."""
    gpt.output_layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)
    try:
        yield
    finally:
        del gpt.output_layer.forward


def response_hidden_states(
    model: torch.nn.Module, tokens: torch.Tensor, logit_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[sequences * response tokens, H]`` that predict each response token,
    and this rank's shard of the output weight (the embedding when tied)."""
    gpt = _gpt_model(model)
    with _output_layer_bypassed(gpt):
        hidden = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    rows = torch.arange(tokens.shape[0])[:, None]
    picked = hidden[rows, logit_index]
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight
    return picked.reshape(-1, picked.shape[-1]), weight


def masked_mean_loss(response_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The paper's normalization: sum over the micro-batch's response tokens / their count."""
    tokens = response_mask.sum()
    total = torch.where(response_mask.bool(), per_token, 0.0).sum()
    loss = total / tokens
    return loss, {"kl_sum": total.detach(), "response_tokens": tokens.detach()}


def make_forward_step(teacher: TeacherSnapshot, divergence: str, vocab_size: int, fused_output_layer: bool = False) -> Callable:
    if fused_output_layer:
        if divergence != "reverse_kl":
            raise ValueError(f"the fused output layer computes the reverse KL only, not {divergence}")
        return partial(_fused_forward_step, teacher, vocab_size)
    divergence_fn = DIVERGENCES[divergence]

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        with torch.no_grad():
            teacher_logits = response_logits(teacher.model, batch.teacher_tokens, batch.teacher_logit_index, vocab_size)
        student_logits = response_logits(model, batch.student_tokens, batch.student_logit_index, vocab_size)
        per_token = divergence_fn(student_logits, teacher_logits, parallel_state.get_tensor_model_parallel_group())
        return per_token, partial(masked_mean_loss, batch.response_mask)

    return forward_step


def _fused_forward_step(teacher: TeacherSnapshot, vocab_size: int, data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
    batch = next(data_iterator)
    with torch.no_grad():
        teacher_hidden, teacher_weight = response_hidden_states(teacher.model, batch.teacher_tokens, batch.teacher_logit_index)
    student_hidden, student_weight = response_hidden_states(model, batch.student_tokens, batch.student_logit_index)
    # Identity forward, all-reduce of the hidden-state gradient over TP in backward: what
    # ColumnParallelLinear does for the unfused output layer.
    student_hidden = copy_to_tensor_model_parallel_region(student_hidden)
    per_token = fused_output_reverse_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, parallel_state.get_tensor_model_parallel_group(),
        vocab_padding=padding_vocab_slice(vocab_size),
    )
    return per_token.view(batch.response_mask.shape), partial(masked_mean_loss, batch.response_mask)
