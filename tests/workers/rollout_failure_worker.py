"""Rollouts that fail, or are stopped, on one rank of two, for tests/test_rollout_engine.py.

Usage: torchrun --nproc-per-node=2 rollout_failure_worker.py CASE   (CASE: error | stop)

Rank 1's engine raises (`error`) or sees a stop request (`stop`) at its first block, while rank 0 answers its
blocks and waits for rank 1's in the gather. Each rank prints `RANK<r>=<error type>: <message> (cause: <its cause's type>)`.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from opsdc_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams, generate_across_ranks


class Engine(RolloutEngine):
    def __init__(self, fails: bool, stops: bool) -> None:
        self.fails = fails
        self.stop_requested = lambda: stops

    @property
    def weight_version(self) -> int:
        return 0

    def update_weights(self, hf_state_dict, version: int) -> None:
        pass

    def generate(self, prompt_ids, sampling, seed):
        if self.fails:
            raise ConnectionError("server gone")
        return [Rollout(i, [7], "stop", 0) for i in range(len(prompt_ids))]


dist.init_process_group("gloo")
rank = dist.get_rank()
case = sys.argv[1]
engine = Engine(fails=rank == 1 and case == "error", stops=rank == 1 and case == "stop")
try:
    generate_across_ranks(engine, [[1, 2]] * 8, SamplingParams(max_new_tokens=1), seed=0, block_prompts=2)
    print(f"RANK{rank}=no error", flush=True)
except Exception as error:
    print(f"RANK{rank}={type(error).__name__}: {error} (cause: {type(error.__cause__).__name__})", flush=True)
dist.barrier()  # both ranks got here: neither waits for the other
dist.destroy_process_group()
