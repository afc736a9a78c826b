"""Accuracy and response length of sampled answers: the numbers the paper's trade-off is made of.

mean@k (the paper's metric): k responses per prompt, each scored dual-path, accuracy averaged over
all of them. Response sample s of a run is drawn with seed `seed + s`, so sample 0 is exactly the
single-sample evaluation with the same seed (the demo's and the training loop's).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from opsdc_megatron.eval.results import SampleStore
from opsdc_megatron.eval.scoring import score_paths
from opsdc_megatron.prompts import PromptRecord, encode_prompt, load_tokenizer, prompt_opens_reasoning, stop_token_ids
from opsdc_megatron.rollout.engine import RolloutEngine, SamplingParams, generate_across_ranks
from opsdc_megatron.rollout.hf_engine import HFRolloutEngine


@dataclass(frozen=True)
class ScoredResponse:
    prompt_index: int
    sample_index: int
    response_tokens: int
    """Sampled tokens, the stop token included."""
    truncated: bool
    """Hit the token limit (finish_reason 'length')."""
    correct: bool
    """Dual-path: the Answer line or the last box matches."""
    answer_line_correct: bool
    boxed_correct: bool
    text: str


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    """mean@k: fraction of all responses (k per prompt) that are correct, dual-path."""
    mean_tokens: float
    truncated: float
    """Fraction of responses that hit the token limit."""
    n: int
    """Prompts."""
    samples_per_prompt: int
    median_tokens: float
    p90_tokens: float
    """90th percentile of response tokens (linear interpolation)."""
    accuracy_answer_line: float
    """Single-format accuracies: what a scorer reading only one path would report."""
    accuracy_boxed: float
    per_level: dict[str, dict[str, float]]
    """level -> {accuracy, mean_tokens, n}, where the records carry a 'level'."""
    responses: tuple[ScoredResponse, ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict:
        """The summary (no responses): what metrics.jsonl and result files record."""
        summary = asdict(self)
        del summary["responses"]
        return summary


def summarize(records: list[PromptRecord], responses: list[ScoredResponse], samples_per_prompt: int) -> EvalResult:
    """Accuracy, length statistics and the per-level breakdown of scored responses."""
    lengths = [r.response_tokens for r in responses]
    total = len(responses)
    per_level: dict[str, dict[str, float]] = {}
    levels = sorted({str(r.extra["level"]) for r in records if "level" in r.extra})
    for level in levels:
        mine = [r for r in responses if str(records[r.prompt_index].extra.get("level")) == level]
        per_level[level] = {
            "accuracy": sum(r.correct for r in mine) / len(mine),
            "mean_tokens": sum(r.response_tokens for r in mine) / len(mine),
            "n": len(mine) // samples_per_prompt,
        }
    return EvalResult(
        accuracy=sum(r.correct for r in responses) / total,
        mean_tokens=sum(lengths) / total,
        truncated=sum(r.truncated for r in responses) / total,
        n=len(records),
        samples_per_prompt=samples_per_prompt,
        median_tokens=float(statistics.median(lengths)),
        p90_tokens=float(numpy.percentile(lengths, 90)),
        accuracy_answer_line=sum(r.answer_line_correct for r in responses) / total,
        accuracy_boxed=sum(r.boxed_correct for r in responses) / total,
        per_level=per_level,
        responses=tuple(responses),
    )


def evaluate(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    records: list[PromptRecord],
    sampling: SamplingParams,
    seed: int,
    block_prompts: int,
    instruction: str | None = None,
    progress: str | None = None,
    samples_per_prompt: int = 1,
    store: SampleStore | None = None,
) -> EvalResult:
    """`samples_per_prompt` sampled responses per record, scored dual-path; `instruction` evaluates instructed prompts.

    Under torch.distributed the prompts are shared across ranks and every rank gets the result.
    `store` (one process only) keeps each finished sample and hands back those an interrupted run left.
    """
    prompt_ids = [encode_prompt(tokenizer, r.prompt, instruction) for r in records]
    reasoning_open = prompt_opens_reasoning(tokenizer)
    done = store.finished() if store is not None else {}
    responses = []

    def scored(prompt_index: int, sample: int, response_tokens: int, truncated: bool, text: str) -> ScoredResponse:
        answer_line_correct, boxed_correct = score_paths(text, records[prompt_index].answer, reasoning_open)
        return ScoredResponse(
            prompt_index, sample, response_tokens, truncated, answer_line_correct or boxed_correct, answer_line_correct, boxed_correct, text,
        )

    for sample in range(samples_per_prompt):
        if sample in done:  # scored again: the scorer may have changed since they were drawn
            responses += [scored(r.prompt_index, sample, r.response_tokens, r.truncated, r.text) for r in done[sample]]
            continue
        label = f"{progress} (sample {sample + 1}/{samples_per_prompt})" if progress and samples_per_prompt > 1 else progress
        rollouts = generate_across_ranks(engine, prompt_ids, sampling, seed + sample, block_prompts, label)
        drawn = [
            scored(rollout.prompt_index, sample, len(rollout.response_ids), rollout.finish_reason == "length",
                   tokenizer.decode(rollout.response_ids, skip_special_tokens=True))
            for rollout in rollouts
        ]
        if store is not None:
            store.save(sample, drawn)
        responses += drawn
    return summarize(records, responses, samples_per_prompt)


def make_engine(name: str, model_dir: Path, dtype: torch.dtype = torch.float32, **server_options: object) -> RolloutEngine:
    """A rollout engine serving the weights of a Hugging Face folder; close() releases what it started.

    hf: in-process transformers. sglang: SGLang servers started from .venv-sglang on the folder
    (`server_options`: num_servers, python, base_port, log_dir of `rollout.sglang.start.serve_hf_folder`).
    """
    if name == "hf":
        return HFRolloutEngine.from_pretrained(str(model_dir), dtype)
    if name == "sglang":
        from opsdc_megatron.rollout.sglang.start import serve_hf_folder

        tokenizer = load_tokenizer(model_dir)
        vocab_size = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
        sglang_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        return serve_hf_folder(model_dir, stop_token_ids(model_dir, tokenizer), vocab_size, sglang_dtype, **server_options)
    raise ValueError(f"unknown rollout engine {name!r}, expected hf or sglang")


def evaluate_model(
    model_dir: str | Path, records: list[PromptRecord], instructions: dict[str, str | None], sampling: SamplingParams,
    seed: int, block_prompts: int = 64, samples_per_prompt: int = 1, engine: str = "hf", dtype: torch.dtype = torch.float32,
    server_options: dict | None = None, on_result: Callable[[str, EvalResult], None] | None = None,
    store_for: Callable[[str], SampleStore] | None = None,
) -> dict[str, EvalResult]:
    """One model folder on the same records and seeds under each named instruction (None: plain prompts).

    The engine is started for this call and stopped after it (`server_options`: see make_engine).
    `on_result(name, result)` runs as each instruction's pass ends (to save it before the next one starts);
    `store_for(name)` gives the pass its SampleStore (see `evaluate`).
    """
    tokenizer = load_tokenizer(model_dir)  # before the engine: a folder it cannot serve fails at once
    rollout_engine = make_engine(engine, Path(model_dir), dtype, **(server_options or {}))
    results = {}
    try:
        for name, text in instructions.items():
            store = store_for(name) if store_for is not None else None
            results[name] = evaluate(rollout_engine, tokenizer, records, sampling, seed, block_prompts, text, f"{name} prompts", samples_per_prompt, store)
            if on_result is not None:
                on_result(name, results[name])
        return results
    finally:
        rollout_engine.close()
