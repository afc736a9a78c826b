"""Rollouts: the student samples its own responses; the RolloutEngine interface every backend implements.

The trainer owns the weights: after each optimizer step it pushes them to the engine
(`update_weights`) with a version number, and every rollout records the version it was sampled
with, so a stale rollout is detectable. Backends: `hf_engine` (in-process transformers); an SGLang
backend implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    max_new_tokens: int = 8192


@dataclass(frozen=True)
class Rollout:
    prompt_index: int
    """Index of the prompt in the caller's list: every prompt is answered exactly once."""
    response_ids: list[int]
    """Sampled tokens, including the stop token when finish_reason is 'stop'."""
    finish_reason: str
    """'stop' (emitted a stop token) or 'length' (hit max_new_tokens)."""
    weight_version: int


class RolloutEngineError(RuntimeError):
    """Rollouts or a weight push failed on some rank, and every rank raises this alike (the failing rank's own
    error is its cause), so that all can go on to the same collective, none left waiting for another."""


class RolloutInterrupted(RolloutEngineError):
    """A stop request (a signal, the stop file) ended the rollouts before every prompt was answered."""


def _never() -> bool:
    return False


class RolloutEngine(ABC):
    stop_requested: Callable[[], bool] = staticmethod(_never)
    """Asked between blocks of prompts (and by an engine that waits on servers, while it waits): true ends
    the rollouts with `RolloutInterrupted`. The trainer sets it to its stop watch's local check: a SIGTERM
    to a SLURM job reaches the rollout servers too, and rollouts that wait for them would outlast the
    seconds before SIGKILL that the checkpoint needs."""

    @abstractmethod
    def update_weights(self, hf_state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the served weights (Hugging Face names, full tensors)."""

    @property
    @abstractmethod
    def weight_version(self) -> int: ...

    @property
    def reads_pushed_weights(self) -> bool:
        """Whether `update_weights` on this rank reads the tensors (else an empty dict will do, and
        the trainer does not keep a host copy of the model on this rank)."""
        return True

    def release_weights(self) -> None:
        """Called before the trainer empties the dict it last passed to `update_weights` (to build the
        next one without two host copies of the model): an engine that still reads it must let go first."""

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int) -> list[Rollout]:
        """One sampled response per prompt, in prompt order; `seed` makes the draw reproducible."""

    def serving_other_ranks(self) -> AbstractContextManager:
        """Held while this rank waits for the other ranks' rollouts: an engine that owns servers they use
        keeps them up meanwhile (the other ranks cannot restart them)."""
        return nullcontext()

    def close(self) -> None:
        """Releases what the engine started (servers, process groups); in-process engines hold nothing."""


def generate_across_ranks(
    engine: RolloutEngine,
    prompt_ids: list[list[int]],
    sampling: SamplingParams,
    seed: int,
    block_prompts: int,
    progress: str | None = None,
) -> list[Rollout]:
    """Prompts in fixed blocks, blocks dealt round-robin to ranks, all rollouts gathered on every rank.

    Each block is sampled with its own seed (seed, block index), so the rollouts depend only on the
    seed and the block size, not on how many ranks share the work: a run at TP=2 samples exactly
    what the same run at TP=1 samples. On CPU this keeps every process busy. `progress` names a
    progress bar shown on rank 0.

    A rank whose rollouts fail, or are interrupted by `engine.stop_requested`, still joins the gather,
    and then every rank raises `RolloutEngineError` naming each failed rank's error (`RolloutInterrupted`
    when each was a stop).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local: list[Rollout] = []
    failure: Exception | None = None
    n_blocks = -(-len(prompt_ids) // block_prompts)
    blocks = range(rank, n_blocks, world)
    try:
        for block in tqdm(blocks, desc=progress, unit="block", disable=progress is None or rank != 0):
            if engine.stop_requested():
                raise RolloutInterrupted(f"a stop was requested before block {block + 1} of {n_blocks}")
            first = block * block_prompts
            part = engine.generate(prompt_ids[first : first + block_prompts], sampling, seed * 1_000_003 + block)
            local += [Rollout(first + r.prompt_index, r.response_ids, r.finish_reason, r.weight_version) for r in part]
    except Exception as error:
        failure = error  # told to the other ranks first: they would wait for this rank's rollouts in the gather
    # A failed rank's part is (error type, message).
    gathered: list[list[Rollout] | tuple[str, str]] = [local if failure is None else (type(failure).__name__, str(failure))]
    if world > 1:
        mine, gathered = gathered[0], [[] for _ in range(world)]
        with engine.serving_other_ranks():
            dist.all_gather_object(gathered, mine)
    failed = {index: part for index, part in enumerate(gathered) if isinstance(part, tuple)}
    if failed:
        kind = RolloutInterrupted if all(name == RolloutInterrupted.__name__ for name, _ in failed.values()) else RolloutEngineError
        raise kind("; ".join(f"rank {index}: {name}: {message}" for index, (name, message) in failed.items())) from failure
    rollouts = sorted((r for part in gathered for r in part), key=lambda r: r.prompt_index)
    if [r.prompt_index for r in rollouts] != list(range(len(prompt_ids))):
        raise RuntimeError("rollout bookkeeping error: a prompt was lost or answered twice")
    return rollouts
