"""Rollouts: the student samples its own responses; the RolloutEngine interface every backend implements.

The trainer owns the weights: after each optimizer step it pushes them to the engine
(`update_weights`) with a version number, and every rollout records the version it was sampled
with, so a stale rollout is detectable. Backends: `hf_engine` (in-process transformers); an SGLang
backend implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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


class RolloutEngine(ABC):
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
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local: list[Rollout] = []
    blocks = range(rank, -(-len(prompt_ids) // block_prompts), world)
    for block in tqdm(blocks, desc=progress, unit="block", disable=progress is None or rank != 0):
        first = block * block_prompts
        part = engine.generate(prompt_ids[first : first + block_prompts], sampling, seed * 1_000_003 + block)
        local += [Rollout(first + r.prompt_index, r.response_ids, r.finish_reason, r.weight_version) for r in part]
    gathered: list[list[Rollout]] = [local]
    if world > 1:
        gathered = [[] for _ in range(world)]
        with engine.serving_other_ranks():
            dist.all_gather_object(gathered, local)
    rollouts = sorted((r for part in gathered for r in part), key=lambda r: r.prompt_index)
    if [r.prompt_index for r in rollouts] != list(range(len(prompt_ids))):
        raise RuntimeError("rollout bookkeeping error: a prompt was lost or answered twice")
    return rollouts
