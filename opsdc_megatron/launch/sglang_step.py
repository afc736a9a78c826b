"""The rollout step of a SLURM job (slurm/opsdc_job.sh): SGLang servers and sglang-router started by srun.

    python -m opsdc_megatron.launch.sglang_step server --recipe R [key=value ...]
    python -m opsdc_megatron.launch.sglang_step router --recipe R --worker-urls URL,URL,... [key=value ...]

Each srun task runs the command the trainer's own launcher builds from `rollout.sglang`
(rollout/sglang/launcher.py), so servers started by the job run with the same flags as servers
started by the trainer: task i of a node (SLURM_LOCALID) serves on port base_port + i and, on GPUs,
on the node's i-th group of tensor_parallel_size GPUs; the router listens on router_port and fails
fast on a dead worker. Both listen on every interface: the trainer runs on other nodes.

A task that fails (a bad flag, CUDA out of memory, a taken port) writes why into $OPSDC_FAILED_TASK_DIR.
The step runs with --kill-on-bad-exit=0, so that a server dying mid-run leaves the others serving; the job
script, waiting for every server's /health, would otherwise see one task's failure only when
rollout.sglang.startup_timeout_s ran out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from opsdc_megatron.config import ConfigError, merge_config
from opsdc_megatron.files import write_text_atomic

FAILED_TASK_DIR = "OPSDC_FAILED_TASK_DIR"


class StepError(Exception):
    """What a task says of its failure, without a traceback (a bad recipe, a taken port)."""


def fail_task(role: str, message: str, status: int = 1) -> NoReturn:
    """Exit, saying why on stderr and, when $OPSDC_FAILED_TASK_DIR is set, in a file there for the job script."""
    print(f"opsdc sglang step: error: {message}", file=sys.stderr, flush=True)
    folder = os.environ.get(FAILED_TASK_DIR)
    if folder:
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        task = os.environ.get("SLURM_PROCID", "0")
        try:
            write_text_atomic(Path(folder) / f"sglang_{role}_task_{task}.failed", f"sglang {role} task {task} on {node}: {message}\n")
        except OSError as error:  # the job script then sees the step end, or its start-up timeout
            print(f"opsdc sglang step: could not tell the job script ({FAILED_TASK_DIR}): {error}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_task(role: str, command: list[str], env: dict[str, str]) -> NoReturn:
    """Runs `command` to its end and exits with its status. A stop signal (srun passes scancel's or the job
    script's SIGTERM to the whole task) is passed on and is no failure; any other non-zero end is."""
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as error:
        fail_task(role, f"{command[0]}: {error}")
    stopping: list[int] = []

    def pass_on(signum: int, _frame) -> None:
        stopping.append(signum)
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    status = child.wait()
    exit_status = 128 - status if status < 0 else status  # as a shell reports a death by signal
    if status != 0 and not stopping:
        end = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        fail_task(role, f"{command[0]} {' '.join(command[1:3])} ... {end}", exit_status)
    sys.exit(exit_status)


def task_process(args: argparse.Namespace):
    """The server or router this task runs, from the recipe, after the checks the trainer's launcher makes.

    Raises:
        StepError: naming the problem.
    """
    try:
        config = merge_config(args.recipe, args.overrides)
    except ConfigError as error:
        raise StepError(str(error)) from None

    from opsdc_megatron.rollout.sglang.launcher import SGLangRouter, SGLangServer, ServerStartError
    from opsdc_megatron.rollout.sglang.start import server_settings

    # Every address of the node (slurm/opsdc_job.sh sets "::" when a rollout node's address is IPv6).
    settings = replace(server_settings(config), host=os.environ.get("OPSDC_BIND_HOST", "0.0.0.0"))
    if not Path(settings.python).exists() and not shutil.which(settings.python):
        raise StepError(f"rollout.sglang.python: SGLang interpreter {settings.python} not found")
    log_dir = Path(settings.log_dir)  # unused: srun's --output collects what the task prints
    if args.role == "server":
        process = SGLangServer(int(os.environ.get("SLURM_LOCALID", "0")), settings, log_dir)
    else:
        worker_urls = [url for url in args.worker_urls.split(",") if url]
        if not worker_urls or not config.rollout.sglang.router_port:
            raise StepError("the router needs --worker-urls and rollout.sglang.router_port")
        process = SGLangRouter(worker_urls, settings, config.rollout.sglang.router_port, log_dir)
    try:  # as the trainer's launcher does: another job's server on this node and port would serve this job
        process.refuse_taken_port()
    except ServerStartError as error:
        raise StepError(str(error)) from None
    return process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opsdc_megatron.launch.sglang_step", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("server", "router"))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--worker-urls", default="", help="router: the servers' URLs, comma-separated")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        process = task_process(args)
    except StepError as error:
        fail_task(args.role, str(error))
    except Exception as error:  # unforeseen (a GPU setting the launcher refuses, say): the job script must hear of it too
        traceback.print_exc()
        fail_task(args.role, f"{type(error).__name__}: {error}")
    print(f"opsdc sglang step: {' '.join(process.command)}", flush=True)
    run_task(args.role, process.command, process.env)


if __name__ == "__main__":
    main()
