"""Accuracy and response length of sampled answers: the numbers the paper's trade-off is made of."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opsdc_megatron.eval.scoring import score
from opsdc_megatron.prompts import PromptRecord, encode_prompt
from opsdc_megatron.rollout.engine import RolloutEngine, SamplingParams, generate_across_ranks
from opsdc_megatron.rollout.hf_engine import HFRolloutEngine


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
    progress: str | None = None,
) -> EvalResult:
    """One sampled response per record, scored dual-path; `instruction` evaluates instructed prompts.

    Under torch.distributed the prompts are shared across ranks and every rank gets the result.
    """
    prompt_ids = [encode_prompt(tokenizer, r.prompt, instruction) for r in records]
    rollouts = generate_across_ranks(engine, prompt_ids, sampling, seed, block_prompts, progress)
    correct = tokens = truncated = 0
    for record, rollout in zip(records, rollouts):
        text = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
        correct += score(text, record.answer)
        tokens += len(rollout.response_ids)
        truncated += rollout.finish_reason == "length"
    n = len(records)
    return EvalResult(correct / n, tokens / n, truncated / n, n)


def evaluate_hf_folder(
    model_dir: str | Path, records: list[PromptRecord], instruction: str, sampling: SamplingParams, seed: int, block_prompts: int = 64
) -> dict[str, EvalResult]:
    """A Hugging Face folder on plain and on instructed prompts (the same records and seed for both)."""
    engine = HFRolloutEngine.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {
        "plain": evaluate(engine, tokenizer, records, sampling, seed, block_prompts, progress="plain prompts"),
        "instructed": evaluate(engine, tokenizer, records, sampling, seed, block_prompts, instruction, "instructed prompts"),
    }
