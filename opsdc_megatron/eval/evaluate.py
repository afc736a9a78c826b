"""Accuracy and response length of sampled answers: the numbers the paper's trade-off is made of."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from opsdc_megatron.eval.scoring import score
from opsdc_megatron.prompts import PromptRecord, encode_prompt
from opsdc_megatron.rollout.engine import RolloutEngine, SamplingParams, generate_across_ranks


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    mean_tokens: float
    truncated: float
    """Fraction of responses that hit the token limit."""
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    records: list[PromptRecord],
    sampling: SamplingParams,
    seed: int,
    block_prompts: int,
    instruction: str | None = None,
) -> EvalResult:
    """One sampled response per record, scored dual-path; `instruction` evaluates instructed prompts.

    Under torch.distributed the prompts are shared across ranks and every rank gets the result.
    """
    prompt_ids = [encode_prompt(tokenizer, r.prompt, instruction) for r in records]
    rollouts = generate_across_ranks(engine, prompt_ids, sampling, seed, block_prompts)
    correct = tokens = truncated = 0
    for record, rollout in zip(records, rollouts):
        text = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
        correct += score(text, record.answer)
        tokens += len(rollout.response_ids)
        truncated += rollout.finish_reason == "length"
    n = len(records)
    return EvalResult(correct / n, tokens / n, truncated / n, n)
