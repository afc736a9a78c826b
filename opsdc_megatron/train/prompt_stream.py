"""The order in which training prompts are used: a fresh permutation every epoch, seeded.

Prompts are tokenized once at start-up (student and teacher forms), so a prompt that is too long
is reported before anything is trained or written. A batch is a pure function of the seed and its
position in the stream, the number of prompts used before it, which the trainer state records: a
resume goes on where the run stopped, also at another train.global_batch_prompts. The trainer state
also records which stream that was (`identity`): a resume with another seed or prompt file goes on in
another order, which the trainer says.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from opsdc_megatron.config import RunConfig
from opsdc_megatron.eval.results import prompts_digest
from opsdc_megatron.prompts import PromptRecord, encode_prompt


class PromptTooLongError(ValueError):
    """A prompt that does not fit data.max_prompt_tokens; names its position in the file."""


@dataclass(frozen=True)
class EncodedPrompt:
    record: PromptRecord
    student_ids: list[int]
    teacher_ids: list[int]


class PromptStream:
    def __init__(self, records: list[PromptRecord], tokenizer: PreTrainedTokenizerBase, config: RunConfig) -> None:
        limit = config.data.max_prompt_tokens
        self.prompts = []
        for number, record in enumerate(records, start=1):
            student = encode_prompt(tokenizer, record.prompt)
            teacher = encode_prompt(tokenizer, record.prompt, config.distill.instruction)
            # Either can be the longer: the instruction replaces a task header the student's prompt keeps (prompts.user_message).
            if max(len(teacher), len(student)) > limit:
                raise PromptTooLongError(
                    f"{config.data.train_prompts}: prompt {number} is {len(student)} tokens as the student's and {len(teacher)} "
                    f"with the teacher's instruction: more than data.max_prompt_tokens = {limit}"
                )
            self.prompts.append(EncodedPrompt(record, student, teacher))
        self.seed = config.train.seed
        self.global_batch_prompts = config.train.global_batch_prompts
        self.identity = {"seed": self.seed, "prompts_sha256": prompts_digest(records)}

    def changes_since(self, recorded: dict | None) -> list[str]:
        """What makes this stream another than the one `identity` recorded (nothing for a checkpoint from
        before the record)."""
        if recorded is None:
            return []
        changes = [f"train.seed is {self.seed}, was {recorded['seed']}"] if recorded["seed"] != self.seed else []
        if recorded["prompts_sha256"] != self.identity["prompts_sha256"]:
            changes.append("the training prompts changed")
        return changes

    @lru_cache(maxsize=2)
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def batch(self, prompts_used: int) -> list[EncodedPrompt]:
        """The next global batch after `prompts_used` prompts of the stream (epochs follow one another)."""
        positions = (divmod(i, len(self.prompts)) for i in range(prompts_used, prompts_used + self.global_batch_prompts))
        return [self.prompts[self._epoch_order(epoch)[index]] for epoch, index in positions]

    def rollout_seed(self, step: int) -> int:
        return self.seed * 1_000_003 + step
