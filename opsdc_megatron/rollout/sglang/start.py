"""The SGLang engine of a training run, built from `rollout.sglang` (config.py).

Trainer rank 0 starts the servers (and the router, if asked), owns them and pushes the weights;
every other rank gets their URLs and only sends rollouts (generate_across_ranks deals it blocks).
With `rollout.sglang.server_urls` the servers were started outside the trainer (the SLURM job's
server step, slurm/opsdc_job.sh): rank 0 only pushes the weights to them, and nothing starts or stops them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from opsdc_megatron.config import ConfigError, RunConfig
from opsdc_megatron.rollout.sglang.engine import SGLangRolloutEngine
from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON, ServerFleet, ServerSettings
from opsdc_megatron.weight_push.sglang_transports import make_transport


def server_settings(config: RunConfig) -> ServerSettings:
    s = config.rollout.sglang
    dtype = s.dtype if s.dtype != "auto" else {"fp32": "float32", "bf16": "bfloat16"}[config.model.params_dtype]
    return ServerSettings(
        model_path=str(Path(config.model.hf_path).resolve()), tensor_parallel_size=s.tensor_parallel_size, dtype=dtype,
        mem_fraction_static=s.mem_fraction_static, max_total_tokens=s.max_total_tokens, base_port=s.base_port,
        python=s.python or str(DEFAULT_SGLANG_PYTHON), startup_timeout_s=s.startup_timeout_s,
        log_dir=str(Path(config.out_dir) / "sglang_logs"),
    )


def start_sglang_engine(config: RunConfig, stop_token_ids: list[int], vocab_size: int) -> SGLangRolloutEngine:
    """Collective over the default process group when one exists; rank 0's start errors reach every rank."""
    s = config.rollout.sglang
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    owner = not dist.is_initialized() or dist.get_rank() == 0
    fleet = None
    if s.server_urls:
        urls = list(s.server_urls)
    else:
        fleet, urls = _start_fleet(config, owner, distributed)
    engine_args = dict(
        stop_token_ids=stop_token_ids, vocab_size=vocab_size, max_concurrent_requests=s.max_concurrent_requests,
        request_timeout_s=s.request_timeout_s, max_attempts=s.max_attempts, stall_timeout_s=s.stall_timeout_s,
        server_tensor_parallel_size=s.tensor_parallel_size,
    )
    if not owner:
        # Rank 0 restarts the servers it started (their start-up, then the current weights' push): wait for that.
        restart_wait_s = 0.0 if s.server_urls else 2 * s.startup_timeout_s
        return SGLangRolloutEngine(urls, None, **engine_args, owner_restart_wait_s=restart_wait_s)
    try:
        # Servers on other hosts join the weight-update groups at this process's address: the job's
        # rendezvous address is trainer rank 0's (torchrun, slurm/opsdc_job.sh), loopback for one process.
        transport = make_transport(
            s.weight_transport, s.bucket_mib * 1024**2, config.model.hf_path, Path(config.out_dir) / "pushed_weights",
            master_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        )
        return SGLangRolloutEngine(fleet or urls, transport, **engine_args)
    except BaseException:
        if fleet is not None:
            fleet.stop()
        raise


def trainer_fleet_settings(config: RunConfig, environ: Mapping[str, str] = os.environ) -> ServerSettings:
    """`server_settings` for servers that trainer rank 0 starts on its own node, next to its ranks.

    They listen on loopback when every trainer rank is on this node, else on this node's address
    (torchrun's WORLD_SIZE > LOCAL_WORLD_SIZE), which the other nodes' ranks send rollouts to.
    On GPUs they share the trainer's GPUs, so the memory fraction they take must be stated:
    SGLang's default takes most of each GPU and the trainer would run out of memory; and the NCCL
    weight push cannot reach them (an NCCL group takes one rank per GPU).
    """
    settings = server_settings(config)
    world_ranks = int(environ.get("WORLD_SIZE", "1"))
    if int(environ.get("LOCAL_WORLD_SIZE", world_ranks)) < world_ranks:
        address = socket.gethostbyname(socket.gethostname())
        if address.startswith("127."):
            raise ConfigError(
                f"the trainer spans several nodes, and this node's name {socket.gethostname()!r} resolves to loopback "
                f"({address}): the other nodes could not reach the SGLang servers trainer rank 0 starts; start them on "
                "their own nodes (slurm.rollout_nodes, or rollout.sglang.server_urls)"
            )
        settings = replace(settings, host=address)
    if not settings.on_cpu and config.rollout.sglang.mem_fraction_static is None:
        raise ConfigError(
            "rollout.sglang.mem_fraction_static is required when the trainer starts its SGLang servers on its own GPUs "
            "(SGLang's default takes most of each GPU's memory, leaving the trainer none): set the fraction the servers "
            "may use, e.g. 0.3, or start them on their own nodes (slurm.rollout_nodes, or rollout.sglang.server_urls)"
        )
    if not settings.on_cpu and config.rollout.sglang.weight_transport == "distributed":
        raise ConfigError(
            "rollout.sglang.weight_transport=distributed cannot reach servers the trainer starts on its own GPUs: trainer "
            "rank 0 and server 0 would be two ranks of one NCCL group on GPU 0, which NCCL refuses ('Duplicate GPU "
            "detected'); use tensor (shared memory, for servers beside the trainer) or disk, or start the servers on "
            "their own nodes (slurm.rollout_nodes, or rollout.sglang.server_urls)"
        )
    return settings


def _start_fleet(config: RunConfig, owner: bool, distributed: bool) -> tuple[ServerFleet | None, list[str]]:
    """Rank 0 starts the servers; every rank gets their URLs (or the start error, re-raised on rank 0)."""
    s = config.rollout.sglang
    fleet, error = None, None
    if owner:
        try:
            fleet = ServerFleet(trainer_fleet_settings(config), s.num_servers, s.router_port or None).start()
        except Exception as failure:  # re-raised below on rank 0, reported on the others
            error = failure
    if distributed:
        shared = [fleet.urls if fleet else None]
        dist.broadcast_object_list(shared, src=0)
        urls = shared[0]
    else:
        urls = fleet.urls if fleet else None
    if error is not None:
        raise error
    if urls is None:
        raise RuntimeError("rank 0 could not start the SGLang servers (see its error)")
    return fleet, urls


def serve_hf_folder(
    model_dir: Path, stop_token_ids: list[int], vocab_size: int, dtype: str, num_servers: int = 1, python: str | None = None,
    base_port: int = 30000, log_dir: Path | None = None, request_timeout_s: float = 3600.0, tensor_parallel_size: int = 1,
    mem_fraction_static: float | None = None,
) -> SGLangRolloutEngine:
    """Servers on a Hugging Face folder's own weights, owned by the returned engine (evaluation: no push).

    `close()` stops them. The request timeout is long: one 30K-token response may take many minutes.
    """
    settings = ServerSettings(
        model_path=str(model_dir.resolve()), dtype=dtype, base_port=base_port, python=python or str(DEFAULT_SGLANG_PYTHON),
        log_dir=str(log_dir) if log_dir else None, tensor_parallel_size=tensor_parallel_size, mem_fraction_static=mem_fraction_static,
    )
    fleet = ServerFleet(settings, num_servers).start()
    try:
        return SGLangRolloutEngine(fleet, None, stop_token_ids, vocab_size, request_timeout_s=request_timeout_s)
    except BaseException:
        fleet.stop()
        raise
