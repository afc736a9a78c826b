"""Rollouts: the student samples its own responses; the RolloutEngine interface every backend implements.

The trainer owns the weights: after each optimizer step it pushes them to the engine
(`update_weights`) with a version number, and every rollout records the version it was sampled
with, so a stale rollout is detectable. Backends: `hf_engine` (in-process transformers); an SGLang
backend implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int) -> list[Rollout]:
        """One sampled response per prompt, in prompt order; `seed` makes the draw reproducible."""


def generate_across_ranks(
    engine: RolloutEngine, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int
) -> list[Rollout]:
    """Every rank samples a strided share of the prompts, then all ranks receive all rollouts.

    On CPU this keeps every core busy; each rank seeds its share with (seed, rank) so the result
    depends only on the seed and the world size.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return engine.generate(prompt_ids, sampling, seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(prompt_ids), world))
    local = engine.generate([prompt_ids[i] for i in mine], sampling, seed * world + rank)
    local = [Rollout(mine[r.prompt_index], r.response_ids, r.finish_reason, r.weight_version) for r in local]
    gathered: list[list[Rollout]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, local)
    rollouts = sorted((r for part in gathered for r in part), key=lambda r: r.prompt_index)
    assert [r.prompt_index for r in rollouts] == list(range(len(prompt_ids))), "a prompt was lost or duplicated"
    return rollouts
