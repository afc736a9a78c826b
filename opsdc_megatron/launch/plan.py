"""The job a recipe asks for on a SLURM cluster, checked before anything waits for GPUs.

`plan_job(config)` turns a recipe's parallel plan and `slurm` section into node and task counts and
refuses layouts whose resource math does not add up (GPUs per node x trainer nodes must equal
tensor x pipeline x data, a tensor-parallel group stays within one node, rollout servers tile a
node). `check_allocation` compares the plan with the allocation a job actually got (passed by the batch script),
so a recipe asking for more than the sbatch header requested fails in seconds, not after queueing.

`python -m opsdc_megatron.launch.plan --recipe R [--validate] [key=value ...]` is what the sbatch
scripts (slurm/opsdc_job.sh) run first: it prints the plan as shell assignments, or one line naming
the problem with exit status 2. With --validate, the trainer's own checks (a model folder absent from this
machine, prompt files) are reported as notes instead of errors, so the H100 scripts can be checked on
a cluster without GPUs or checkpoints.
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from opsdc_megatron.config import MAX_TIMEOUT_S, ConfigError, RunConfig, merge_config, validate


class PlanError(ValueError):
    """A recipe whose resources do not add up, or an allocation too small for it; the message names both."""


@dataclass(frozen=True)
class JobPlan:
    """Node and task counts of one OPSDC job; the rollout nodes come first in the allocation's node list."""

    rollout_engine: str
    rollout_nodes: int
    servers_per_rollout_node: int
    gpus_per_server: int
    server_base_port: int
    """Server i of a rollout node listens on server_base_port + i."""
    router_port: int
    """sglang-router on the first rollout node; 0 = none."""
    server_startup_timeout_s: int
    trainer_nodes: int
    trainer_tasks_per_node: int
    gpus_per_node: int
    out_dir: str
    model_path: str

    @property
    def nodes(self) -> int:
        return self.rollout_nodes + self.trainer_nodes

    def shell(self) -> str:
        """`OPSDC_NAME=value` lines for the sbatch script to eval."""
        return "".join(f"OPSDC_{name.upper()}={shlex.quote(str(value))}\n" for name, value in asdict(self).items())


def plan_job(config: RunConfig) -> JobPlan:
    p, s, servers = config.parallel, config.slurm, config.rollout.sglang
    # What the plan divides by and hands the script, checked here: it runs before the trainer's own checks
    # (config.validate), whose refusals validation mode reports as notes.
    for key, value in (("parallel.tensor_parallel_size", p.tensor_parallel_size), ("parallel.pipeline_parallel_size", p.pipeline_parallel_size),
                       ("parallel.data_parallel_size", p.data_parallel_size), ("rollout.sglang.num_servers", servers.num_servers),
                       ("rollout.sglang.tensor_parallel_size", servers.tensor_parallel_size)):
        if value < 1:
            raise PlanError(f"{key} must be >= 1, got {value}")
    if not 0 < servers.startup_timeout_s <= MAX_TIMEOUT_S:  # config.validate's bound: the job script waits this long
        raise PlanError(f"rollout.sglang.startup_timeout_s must be > 0 and at most {MAX_TIMEOUT_S:.0e} s, got {servers.startup_timeout_s}")
    processes = p.tensor_parallel_size * p.pipeline_parallel_size * p.data_parallel_size
    layout = (f"parallel: tensor {p.tensor_parallel_size} x pipeline {p.pipeline_parallel_size} x "
              f"data {p.data_parallel_size} = {processes} trainer processes")
    if s.trainer_nodes < 1:
        raise PlanError(f"slurm.trainer_nodes must be >= 1, got {s.trainer_nodes}")
    for key, value in (("slurm.gpus_per_node", s.gpus_per_node), ("slurm.rollout_nodes", s.rollout_nodes)):
        if value < 0:
            raise PlanError(f"{key} must be >= 0, got {value}")
    if s.gpus_per_node:
        if processes != s.trainer_nodes * s.gpus_per_node:
            raise PlanError(f"{layout}, but slurm.trainer_nodes x slurm.gpus_per_node = {s.trainer_nodes} x "
                            f"{s.gpus_per_node} = {s.trainer_nodes * s.gpus_per_node} GPUs (one process per GPU)")
        if s.gpus_per_node % p.tensor_parallel_size:
            raise PlanError(f"parallel.tensor_parallel_size ({p.tensor_parallel_size}) must divide slurm.gpus_per_node "
                            f"({s.gpus_per_node}): a tensor-parallel group stays within one node")
        tasks_per_node = s.gpus_per_node
    else:
        if processes % s.trainer_nodes:
            raise PlanError(f"{layout}, which slurm.trainer_nodes ({s.trainer_nodes}) does not divide")
        tasks_per_node = processes // s.trainer_nodes
    if config.rollout.engine == "hf":
        if s.rollout_nodes:
            raise PlanError(f"slurm.rollout_nodes is {s.rollout_nodes}, but rollout.engine=hf generates inside the "
                            f"trainer processes; set slurm.rollout_nodes=0 or rollout.engine=sglang")
        servers_per_node = 0
    elif config.rollout.engine == "sglang":
        servers_per_node = _servers_per_rollout_node(config)
    else:
        raise PlanError(f"rollout.engine must be hf or sglang, got {config.rollout.engine!r}")
    return JobPlan(
        rollout_engine=config.rollout.engine, rollout_nodes=s.rollout_nodes, servers_per_rollout_node=servers_per_node,
        gpus_per_server=servers.tensor_parallel_size, server_base_port=servers.base_port, router_port=servers.router_port,
        server_startup_timeout_s=math.ceil(servers.startup_timeout_s),
        trainer_nodes=s.trainer_nodes, trainer_tasks_per_node=tasks_per_node,
        gpus_per_node=s.gpus_per_node, out_dir=config.out_dir, model_path=config.model.hf_path,
    )


def _servers_per_rollout_node(config: RunConfig) -> int:
    """SGLang servers on each rollout node: one per tensor-parallel group of GPUs (CPU: num_servers spread evenly)."""
    s, servers = config.slurm, config.rollout.sglang
    if not s.rollout_nodes:
        raise PlanError("rollout.engine=sglang needs slurm.rollout_nodes >= 1: the servers run on their own nodes, before the trainer's")
    if s.gpus_per_node:
        if s.gpus_per_node % servers.tensor_parallel_size:
            raise PlanError(f"rollout.sglang.tensor_parallel_size ({servers.tensor_parallel_size}) must divide slurm.gpus_per_node ({s.gpus_per_node})")
        per_node = s.gpus_per_node // servers.tensor_parallel_size
        shape = f"slurm.rollout_nodes x slurm.gpus_per_node / rollout.sglang.tensor_parallel_size = {s.rollout_nodes} x {s.gpus_per_node} / {servers.tensor_parallel_size}"
    else:
        per_node = max(1, servers.num_servers // s.rollout_nodes)
        shape = f"slurm.rollout_nodes x (servers per CPU node) = {s.rollout_nodes} x {per_node}"
    if servers.num_servers != s.rollout_nodes * per_node:
        raise PlanError(f"rollout.sglang.num_servers is {servers.num_servers}, but {shape} = {s.rollout_nodes * per_node} servers")
    if servers.weight_transport == "tensor":
        raise PlanError("rollout.sglang.weight_transport=tensor shares memory with servers on the trainer's host, but the job runs "
                        "them on slurm.rollout_nodes of their own; use distributed or disk")
    return per_node


@dataclass(frozen=True)
class Allocation:
    """What a running job got (the batch script passes SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE, SLURM_CPUS_ON_NODE)."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int


def check_allocation(plan: JobPlan, allocation: Allocation) -> None:
    """Raises PlanError when the allocation is smaller than the plan."""
    wanted = (f"the recipe needs {plan.rollout_nodes} rollout + {plan.trainer_nodes} trainer node(s)"
              + (f" with {plan.gpus_per_node} GPUs each" if plan.gpus_per_node else ""))
    if allocation.nodes < plan.nodes:
        raise PlanError(f"{wanted}, but this allocation has {allocation.nodes} node(s) (SLURM_JOB_NUM_NODES); "
                        f"submit with --nodes={plan.nodes} or change the recipe's slurm section")
    if allocation.gpus_per_node < plan.gpus_per_node:
        raise PlanError(f"{wanted} ({plan.nodes * plan.gpus_per_node} GPUs), but this allocation has "
                        f"{allocation.gpus_per_node} GPU(s) per node (SLURM_GPUS_ON_NODE); submit with --gpus-per-node={plan.gpus_per_node}")
    if allocation.cpus_per_node < plan.trainer_tasks_per_node:
        raise PlanError(f"{wanted} and {plan.trainer_tasks_per_node} trainer processes per node, but this allocation has "
                        f"{allocation.cpus_per_node} CPU(s) per node (SLURM_CPUS_ON_NODE)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opsdc_megatron.launch.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--validate", action="store_true", help="report trainer support and a missing model as notes, not errors")
    parser.add_argument("--allocated-nodes", type=int, help="check against a running job's allocation (with the two below)")
    parser.add_argument("--allocated-gpus-per-node", type=int, default=0)
    parser.add_argument("--allocated-cpus-per-node", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = merge_config(args.recipe, args.overrides)
        plan = plan_job(config)
        if args.allocated_nodes is not None:
            check_allocation(plan, Allocation(args.allocated_nodes, args.allocated_gpus_per_node, args.allocated_cpus_per_node))
        notes = trainer_checks(config, strict=not args.validate)
    except (ConfigError, PlanError) as error:
        print(f"opsdc slurm plan: error: {error}", file=sys.stderr)
        sys.exit(2)
    for note in notes + hf_rollout_memory_notes(config):
        print(f"opsdc slurm plan: note: {note}", file=sys.stderr)
    sys.stdout.write(plan.shell())


def trainer_checks(config: RunConfig, strict: bool) -> list[str]:
    """The trainer's own checks (config.validate, then model and prompt files, then the SGLang environment);
    in validation mode failures become notes, every one of them."""
    from opsdc_megatron.cli import INPUT_ERRORS, preflight

    try:
        validate(config)
    except ConfigError as error:
        if strict:
            raise
        return [f"the trainer refuses this recipe: {error}"]
    checks = [("trainer inputs not checked here", preflight)]
    if config.rollout.engine == "sglang":
        checks.append(("the SGLang environment", check_sglang_interpreter))
    notes = []
    for what, check in checks:
        try:
            check(config)
        except INPUT_ERRORS as error:
            if strict:
                raise PlanError(str(error)) from None
            notes.append(f"{what}: {error}")
    return notes


def hf_rollout_memory_notes(config: RunConfig) -> list[str]:
    """rollout.engine=hf on GPUs: what each trainer GPU holds besides what `opsdc plan` counts."""
    if config.rollout.engine != "hf" or not config.slurm.gpus_per_node:
        return []
    from opsdc_megatron.plan import GIB, ModelShape

    note = "rollout.engine=hf on GPUs: every trainer GPU also holds the whole model unsharded plus its KV cache for a generation block, which `opsdc plan` does not count"
    try:
        model = ModelShape.from_hf_config(Path(config.model.hf_path))
    except (OSError, ValueError):
        return [note]
    value_bytes = 2 if config.model.params_dtype == "bf16" else 4
    block_tokens = config.rollout.generation_batch_prompts * (config.data.max_prompt_tokens + config.rollout.max_response_tokens)
    kv_cache = block_tokens * model.layers * 2 * model.kv_heads * model.head_dim * value_bytes
    return [f"{note}: {model.params * value_bytes / GIB:.1f} GiB of {config.model.params_dtype} weights and up to {kv_cache / GIB:.1f} GiB "
            f"of KV cache (rollout.generation_batch_prompts x (data.max_prompt_tokens + rollout.max_response_tokens) = "
            f"{block_tokens} tokens); large models want rollout.engine=sglang (slurm/<recipe>.sbatch)"]


ENVIRONMENT_PROBE = (
    "import importlib.util, json, torch; print(json.dumps({"
    "'sglang': importlib.util.find_spec('sglang') is not None, 'sglang_router': importlib.util.find_spec('sglang_router') is not None, "
    "'torch': torch.__version__, 'nccl': list(torch.cuda.nccl.version()) if torch.version.cuda else None}))"
)
"""What `check_sglang_interpreter` asks the SGLang interpreter: its packages and the NCCL its torch links."""


def check_sglang_servers_to_start(config: RunConfig) -> None:
    """For a run whose rank 0 starts its own servers (SGLang rollouts, no server_urls): their settings beside the
    trainer (`trainer_fleet_settings`, which rank 0 applies again) and `check_sglang_interpreter`, before any rank starts."""
    if config.rollout.engine == "sglang" and not config.rollout.sglang.server_urls:
        from opsdc_megatron.rollout.sglang.start import trainer_fleet_settings

        trainer_fleet_settings(config)
        check_sglang_interpreter(config)


def check_sglang_interpreter(config: RunConfig) -> None:
    """The SGLang interpreter exists, has sglang (and sglang_router when the recipe starts a router), and for a
    weight push over NCCL (distributed transport on GPUs) links the NCCL version this trainer's torch does:
    NCCL refuses a communicator whose ranks run different versions, and the push would fail only after the
    servers' start and the model load."""
    import json
    import subprocess

    import torch

    from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON

    servers = config.rollout.sglang
    python = servers.python or str(DEFAULT_SGLANG_PYTHON)
    if config.slurm.gpus_per_node and not servers.python:
        raise ValueError(
            f"rollout.sglang.python: GPU servers need a CUDA build of SGLang; the default {DEFAULT_SGLANG_PYTHON} is the "
            "CPU build tools/setup_sglang.sh makes for the tests. Set rollout.sglang.python to a CUDA SGLang's interpreter"
        )
    if not Path(python).exists() and not shutil.which(python):
        raise FileNotFoundError(f"rollout.sglang.python: SGLang interpreter {python} not found (tools/setup_sglang.sh makes .venv-sglang)")
    try:
        probe = subprocess.run([python, "-c", ENVIRONMENT_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"rollout.sglang.python: {python} could not be run: {error}") from None
    try:
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ValueError(f"rollout.sglang.python: {python} could not import torch (exit status {probe.returncode}): "
                         f"{probe.stderr.strip()[-500:]}") from None
    if not found["sglang"]:
        raise ValueError(f"rollout.sglang.python: {python} has no sglang package (pip install sglang==0.5.23)")
    if servers.router_port and not found["sglang_router"]:
        raise ValueError(f"rollout.sglang.router_port is set, but {python} has no sglang_router package "
                         f"(pip install sglang-router), or set rollout.sglang.router_port=0")
    ours = list(torch.cuda.nccl.version()) if torch.version.cuda else None
    if config.slurm.gpus_per_node and servers.weight_transport == "distributed" and ours and found["nccl"] and ours != found["nccl"]:
        raise ValueError(
            f"rollout.sglang.weight_transport=distributed: the trainer's torch {torch.__version__} links NCCL "
            f"{'.'.join(map(str, ours))}, {python}'s torch {found['torch']} links NCCL {'.'.join(map(str, found['nccl']))}, and NCCL "
            f"refuses a group whose ranks run different versions: install the same nvidia-nccl wheel in both "
            f"environments, or use rollout.sglang.weight_transport=disk"
        )


if __name__ == "__main__":
    main()
