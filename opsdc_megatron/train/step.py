"""The optimizer step: megatron-core DDP, its AdamW optimizer, and its forward-backward schedules.

A rank holds one model chunk per virtual pipeline stage (one without interleaving); each chunk is
a `DistillStage` of student (DDP-wrapped) and teacher layers. megatron picks the schedule from the
pipeline sizes: no pipelining, 1F1B, or interleaved 1F1B.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from opsdc_megatron.config import ParallelConfig, TrainConfig
from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.stage import DistillStage


def wrap_for_training(
    chunks: list[torch.nn.Module], train: TrainConfig, parallel: ParallelConfig
) -> tuple[list[DistributedDataParallel], MegatronOptimizer]:
    """megatron-core DDP per model chunk (gradients reduced in fp32 over data-parallel ranks, optionally
    overlapped with the backward) and AdamW, optionally megatron's DistributedOptimizer (state sharded
    over data-parallel ranks).

    The chunks are used as built (params already in their training dtype); Float16Module is not used
    because it would cast the vocabulary-sized logits to fp32, which the divergence does not need.
    """
    config = chunks[0].config
    # The loss function returns (a sum, its weight: response tokens, or 1 per micro-batch); the schedules
    # and finalize_model_grads then divide the summed gradient once by the step's total weight over all
    # micro-batches and data-parallel ranks (distill/forward.py says why). DDP reads this flag
    # when it is built, to sum rather than average gradients over data-parallel ranks.
    config.calculate_per_token_loss = True
    # FP8 parameters (model.fp8.param_gather, TransformerConfig.fp8_param): megatron-core 0.19's distributed
    # optimizer writes its updated main weights back into them only with DDP's fp8_param_gather (Megatron-LM's
    # --fp8-param-gather sets both); without it the FP8 GEMM weights never changed.
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce, bucket_size=parallel.grad_reduce_bucket_elements,
        use_distributed_optimizer=parallel.distributed_optimizer, fp8_param_gather=config.fp8_param,
    )
    # Buckets only for the first chunk, as megatron's own get_model does.
    ddps = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    # With overlap the schedules, which run DistillStages and not DDPs, must be told how to hold the
    # reductions back until the last micro-batch (no_sync) and, with pipeline stages, how to start them
    # then (grad_sync: Megatron-LM's --align-grad-reduce); finalize_model_grads waits for them.
    overlap = parallel.overlap_grad_reduce
    config.no_sync_func = _one_or_list([ddp.no_sync for ddp in ddps]) if overlap else None
    config.grad_sync_func = _one_or_list([ddp.start_grad_sync for ddp in ddps]) if overlap else None
    # The schedules hand finalize_model_grads the chunks they ran (DistillStages); it needs the DDPs.
    config.finalize_model_grads_func = partial(_finalize_student_grads, ddps)
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
            use_distributed_optimizer=parallel.distributed_optimizer,
            fp8_recipe=config.fp8_recipe if config.fp8 else None,
        ),
        ddps,
    )
    apply_optimizer_settings(optimizer, train)
    return ddps, optimizer


def _one_or_list(functions: list[Callable]) -> Callable | list[Callable]:
    """What megatron's schedules take: one function for one model chunk, a list for interleaved chunks."""
    return functions[0] if len(functions) == 1 else functions


def apply_optimizer_settings(optimizer: MegatronOptimizer, train: TrainConfig) -> None:
    """The recipe's learning rate, Adam betas and eps in every param group, and each group's decay from
    megatron's wd_mult (0 for norms and biases, as in Megatron-LM).

    megatron's OptimizerParamScheduler sets learning rate and decay each step; runs here have a constant
    learning rate and no scheduler, so this does, after the optimizer is built and after a checkpoint is
    loaded: the load restores the groups' saved values, so a run resumed with another `train.lr` kept
    the old one (and checkpoints written before wd_mult was applied decay every group). `max_lr` and
    `min_lr` are left alone: megatron-core 0.19 finds a checkpoint's param groups by them, and
    load_checkpoint sets them to the saved ones.
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = train.weight_decay * group["wd_mult"]
        group["lr"] = train.lr * group["lr_mult"]
        group["betas"] = (train.adam_beta1, train.adam_beta2)
        group["eps"] = train.adam_eps


def _finalize_student_grads(ddps: list[DistributedDataParallel], _stages, num_tokens, **kwargs) -> None:
    finalize_model_grads(ddps, num_tokens, **kwargs)


def gradients_are_finite(stages: list[DistillStage]) -> bool:
    """Collective over all ranks: whether every gradient buffer of every rank is finite.

    megatron's optimizer checks gradients only under a loss scaler (fp16, which runs here do not use):
    in bf16 and fp32 it applies nan or inf gradients, and the run would push, save and export the
    broken weights.
    """
    buffers = [buffer.grad_data for stage in stages for buffer in stage.module.buffers + stage.module.expert_parallel_buffers]
    device = buffers[0].device if buffers else next(stages[0].module.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grads in buffers:
        total += finite_check_sum(grads)
    torch.distributed.all_reduce(total)
    return bool(torch.isfinite(total))


FINITE_CHECK_CHUNK_ELEMENTS = 1 << 24


def finite_check_sum(values: Tensor) -> Tensor:
    """The fp64 sum of a flat buffer, nan or inf exactly when an element is (fp64: no overflow): one read, no mask.
    In chunks: a sum in another dtype first converts the whole input, a 27 GiB fp64 copy of the gradient buffer a
    Qwen3-14B rank holds at TP=4; a chunk's is 128 MiB."""
    return torch.stack([chunk.sum(dtype=torch.float64) for chunk in values.reshape(-1).split(FINITE_CHECK_CHUNK_ELEMENTS)]).sum()


@dataclass(frozen=True)
class StepResult:
    loss: float
    """The step's objective, all ranks: the per-token divergence averaged over every response token of the
    step, or over each micro-batch's first and then over micro-batches (distill.loss_normalization)."""
    grad_norm: float
    response_tokens: int
    """Response tokens of the step, all data-parallel ranks."""


def optimizer_step(
    stages: list[DistillStage],
    optimizer: MegatronOptimizer,
    forward_step: Callable,
    micro_batches: list[MicroBatch],
) -> StepResult:
    """One optimizer step over this data-parallel rank's micro-batches (collective).

    Raises:
        ValueError: interleaved stages (several chunks) with micro-batches that send messages of
            different shapes between stages (build them with ``micro_batches_for_rank(...,
            interleaved_pipeline_size=...)``).
        FloatingPointError: a gradient is nan or inf on some rank (raised on every rank, before the update).
    """
    interleaved = len(stages) > 1
    # What DistillStage sends between stages: [student + teacher tokens, rows, hidden].
    shapes = {(b.student_tokens.shape[1] + b.teacher_tokens.shape[1], b.student_tokens.shape[0]) for b in micro_batches}
    if interleaved and len(shapes) > 1:
        raise ValueError(
            f"the interleaved pipeline schedule needs micro-batches of one message shape, got {sorted(shapes)}; "
            f"build them with micro_batches_for_rank(..., interleaved_pipeline_size=...)"
        )
    # Built on the host (distill/batch.py); the model's device from here on.
    device = next(stages[0].module.parameters()).device
    micro_batches = [batch.to(device) for batch in micro_batches]
    for stage in stages:
        stage.module.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        # The interleaved schedule pulls each chunk's micro-batches from that chunk's iterator.
        data_iterator=[iter(micro_batches) for _ in stages] if interleaved else iter(micro_batches),
        model=stages,
        num_microbatches=len(micro_batches),
        # Shapes travel with each micro-batch (variable_seq_lengths); these only size the first guess.
        seq_length=max(b.student_tokens.shape[1] + b.teacher_tokens.shape[1] for b in micro_batches),
        micro_batch_size=max(b.student_tokens.shape[0] for b in micro_batches),
        forward_only=False,
    )
    if not gradients_are_finite(stages):
        raise FloatingPointError("non-finite gradients (nan or inf) in this step; the weights were not updated")
    _, grad_norm, _ = optimizer.step()
    # Only the last pipeline stage sees the losses: sum there, share over the pipeline, then over
    # data-parallel ranks.
    totals = torch.tensor([
        sum(float(o["objective"]) for o in outputs),
        sum(float(o["weight"]) for o in outputs),
        sum(float(o["response_tokens"]) for o in outputs),
    ], dtype=torch.float64, device=device)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        totals.zero_()
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    objective, weight, tokens = totals.tolist()
    return StepResult(objective / weight, float(grad_norm), int(tokens))
