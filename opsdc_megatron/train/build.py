"""The trained model as one object: student chunks (DDP), optimizer, teacher snapshot, pipeline stages.

Built the same way by `opsdc train` and by the parallel-layout tests, from a Hugging Face folder and
the parallel sizes megatron's groups were initialised with (`parallel.init_distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer
from transformers import PretrainedConfig

from opsdc_megatron.config import ParallelConfig, TrainConfig
from opsdc_megatron.distill.stage import DistillStage
from opsdc_megatron.distill.teacher import TeacherSnapshot
from opsdc_megatron.models.qwen3.model import build_model_chunks
from opsdc_megatron.models.qwen3.state_dict_adapter import load_hf_weights
from opsdc_megatron.train.checkpoint import load_model_weights
from opsdc_megatron.train.step import wrap_for_training


@dataclass
class TrainingModel:
    student: list[GPTModel]
    """This rank's student chunks, one per virtual pipeline stage."""
    ddps: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    teacher: TeacherSnapshot
    """Its model is a ModuleList of the teacher chunks matching `student`."""
    stages: list[DistillStage]
    """What the forward-backward schedules run: student and teacher chunk per virtual stage."""


def build_training_model(
    hf_config: PretrainedConfig,
    hf_path: str,
    parallel: ParallelConfig,
    params_dtype: torch.dtype,
    train: TrainConfig,
    teacher_refresh_every: int,
    *,
    model_options: dict[str, Any] | None = None,
    megatron_checkpoint: str | None = None,
    fused_output_layer: bool = False,
    teacher_offload: bool = False,
) -> TrainingModel:
    """Student loaded from `hf_path` (or from `megatron_checkpoint`, a dist checkpoint of any layout),
    wrapped for training; the teacher a copy of it. `model_options`: `build_gpt_model`'s keyword
    options (attention backend, FP8, activation recompute). `teacher_offload`: the teacher is built
    in host memory and streamed to the device layer by layer (distill/teacher_offload.py)."""
    sizes = (parallel.tensor_parallel_size, parallel.pipeline_parallel_size, params_dtype, parallel.virtual_pipeline_chunks)
    model_options = dict(model_options or {}, sequence_parallel=parallel.sequence_parallel)
    student = build_model_chunks(hf_config, *sizes, **model_options)
    if megatron_checkpoint:
        load_model_weights(Path(megatron_checkpoint), student)
    else:
        load_hf_weights(student, hf_path)
    ddps, optimizer = wrap_for_training(student, train, parallel)
    teacher_chunks = build_model_chunks(hf_config, *sizes, **model_options, empty_on_host=teacher_offload)
    teacher = TeacherSnapshot(torch.nn.ModuleList(teacher_chunks), teacher_refresh_every, teacher_offload, not fused_output_layer)
    teacher.copy_from(torch.nn.ModuleList(student))
    stages = [
        DistillStage(ddp, chunk, hf_config.vocab_size, fused_output_layer, stream)
        for ddp, chunk, stream in zip(ddps, teacher.model, teacher.streams)
    ]
    return TrainingModel(student, ddps, optimizer, teacher, stages)
