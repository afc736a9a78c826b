"""Process groups for training: torch.distributed plus megatron-core's model-parallel groups.

One call sets up everything a rank needs before building a model: the default process group
(from torchrun's environment, or a one-process world when run as a plain script), megatron's
tensor/pipeline/data-parallel groups, and megatron's RNG trackers. On machines without a GPU it
uses gloo and applies `opsdc_megatron.cpu_platform`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from opsdc_megatron.cpu_platform import apply_cpu_platform

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TIMEOUT = timedelta(minutes=30)


def _world_size_from_env() -> int | None:
    """torchrun's world size, or None when not launched by torchrun (a one-process world)."""
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARS):
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise RuntimeError(
            f"incomplete torchrun environment: {present} are set but {missing} are not; "
            f"launch with torchrun or unset them to run as a single process"
        )
    return int(os.environ["WORLD_SIZE"])


def init_distributed(
    tensor_parallel_size: int, pipeline_parallel_size: int = 1, seed: int = 0, virtual_pipeline_chunks: int = 1
) -> None:
    """Initialise torch.distributed and megatron's parallel groups and RNG on this rank.

    Reuses the default process group if one already exists (e.g. to switch the TP size within a
    process after `parallel_state.destroy_model_parallel()`). The data-parallel size is what is
    left: world_size / (tensor_parallel_size * pipeline_parallel_size). `virtual_pipeline_chunks` > 1
    gives each pipeline rank that many model chunks (interleaved 1F1B).

    Raises:
        ValueError: sizes below 1, or a world size they do not divide; raised before any
            process group is created, so a bad launch fails fast on every rank.
    """
    for name, size in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
        ("virtual_pipeline_chunks", virtual_pipeline_chunks),
    ):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = _world_size_from_env() or 1
    model_parallel_size = tensor_parallel_size * pipeline_parallel_size
    if world_size % model_parallel_size != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel_size * "
            f"pipeline_parallel_size = {tensor_parallel_size} * {pipeline_parallel_size} = "
            f"{model_parallel_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron's model-parallel groups already exist; call destroy_distributed() "
            "(or parallel_state.destroy_model_parallel()) first"
        )

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        apply_cpu_platform()
    if not dist.is_initialized():
        backend = "nccl" if on_gpu else "gloo"
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if _world_size_from_env() is None:
            # A plain `python script.py`: a one-rank world on an in-memory store, no port needed.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=_TIMEOUT)
        else:
            dist.init_process_group(backend, timeout=_TIMEOUT)

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_chunks if virtual_pipeline_chunks > 1 else None,
    )
    # The CPU generator drives use_cpu_initialization: the same seed on every rank gives every
    # rank the same master weights, which megatron then splits over TP.
    torch.manual_seed(seed)
    # megatron's default tracker saves and restores CUDA RNG states; on CPU there are none, so use
    # its built-in inference tracker (fork() is a no-op). That only matters for dropout, which the
    # Qwen3 models here run with at 0.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not on_gpu, force_reset_rng=True)


def destroy_distributed() -> None:
    """Tear down megatron's parallel groups and the default process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
