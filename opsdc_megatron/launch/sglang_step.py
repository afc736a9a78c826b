"""The rollout step of a SLURM job (slurm/opsdc_job.sh): SGLang servers and sglang-router started by srun.

    python -m opsdc_megatron.launch.sglang_step server --recipe R [key=value ...]
    python -m opsdc_megatron.launch.sglang_step router --recipe R --worker-urls URL,URL,... [key=value ...]

Each srun task replaces itself (exec) with the command the trainer's own launcher builds from
`rollout.sglang` (rollout/sglang/launcher.py), so servers started by the job run with the same flags as
servers started by the trainer: task i of a node (SLURM_LOCALID) serves on port base_port + i and, on
GPUs, on the node's i-th group of tensor_parallel_size GPUs; the router listens on router_port and
fails fast on a dead worker. Both listen on every interface: the trainer runs on other nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from opsdc_megatron.config import ConfigError, merge_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opsdc_megatron.launch.sglang_step", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("server", "router"))
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--worker-urls", default="", help="router: the servers' URLs, comma-separated")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        config = merge_config(args.recipe, args.overrides)
    except ConfigError as error:
        sys.exit(f"opsdc sglang step: error: {error}")

    from opsdc_megatron.rollout.sglang.launcher import SGLangRouter, SGLangServer, ServerStartError
    from opsdc_megatron.rollout.sglang.start import server_settings

    # Every address of the node (slurm/opsdc_job.sh sets "::" when a rollout node's address is IPv6).
    settings = replace(server_settings(config), host=os.environ.get("OPSDC_BIND_HOST", "0.0.0.0"))
    if not Path(settings.python).exists() and not shutil.which(settings.python):
        sys.exit(f"opsdc sglang step: error: rollout.sglang.python: SGLang interpreter {settings.python} not found")
    log_dir = Path(settings.log_dir)  # unused: srun's --output collects what the exec'd process prints
    if args.role == "server":
        process = SGLangServer(int(os.environ.get("SLURM_LOCALID", "0")), settings, log_dir)
    else:
        worker_urls = [url for url in args.worker_urls.split(",") if url]
        if not worker_urls or not config.rollout.sglang.router_port:
            sys.exit("opsdc sglang step: error: the router needs --worker-urls and rollout.sglang.router_port")
        process = SGLangRouter(worker_urls, settings, config.rollout.sglang.router_port, log_dir)
    try:  # as the trainer's launcher does: another job's server on this node and port would serve this job
        process.refuse_taken_port()
    except ServerStartError as error:
        sys.exit(f"opsdc sglang step: error: {error}")
    print(f"opsdc sglang step: {' '.join(process.command)}", flush=True)
    os.execvpe(process.command[0], process.command, process.env)


if __name__ == "__main__":
    main()
