"""The optimizer step: megatron-core DDP, its AdamW optimizer, and its forward-backward schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from opsdc_megatron.config import TrainConfig
from opsdc_megatron.distill.batch import MicroBatch


def wrap_for_training(model: torch.nn.Module, train: TrainConfig) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    """megatron-core DDP (gradients reduced in fp32 over data-parallel ranks) and AdamW.

    The model is used as built (params already in their training dtype); Float16Module is not used
    because it would cast the vocabulary-sized logits to fp32, which the divergence does not need.
    """
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=train.lr,
            min_lr=train.lr,
            weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            adam_eps=train.adam_eps,
            clip_grad=train.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=False,
        ),
        [ddp],
    )
    return ddp, optimizer


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean over micro-batches of each micro-batch's mean per-token divergence (the paper's loss)."""
    mean_kl: float
    """Per-token divergence averaged over every response token of the step."""
    grad_norm: float
    response_tokens: int
    """Response tokens of the step, all data-parallel ranks."""


def optimizer_step(
    ddp: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    forward_step: Callable,
    micro_batches: list[MicroBatch],
) -> StepResult:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=len(micro_batches),
        seq_length=max(b.student_tokens.shape[1] for b in micro_batches),
        micro_batch_size=micro_batches[0].student_tokens.shape[0],
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:
        raise FloatingPointError("optimizer step skipped: non-finite gradients")
    # The schedule divides each returned loss by the number of micro-batches in place, so the
    # loss is recomputed from each micro-batch's (divergence sum, response tokens), over all
    # data-parallel ranks.
    totals = torch.tensor([
        sum(float(o["kl_sum"]) / float(o["response_tokens"]) for o in outputs),
        len(outputs),
        sum(float(o["kl_sum"]) for o in outputs),
        sum(float(o["response_tokens"]) for o in outputs),
    ], dtype=torch.float64)
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    loss_sum, micro_batches_total, kl_sum, tokens = totals.tolist()
    return StepResult(loss_sum / micro_batches_total, kl_sum / tokens, float(grad_norm), int(tokens))
