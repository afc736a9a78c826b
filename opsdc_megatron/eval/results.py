"""Evaluation result files: one JSON summary per (benchmark, model, instruction) and its scored responses.

    <dir>/<benchmark>.<model>.<instruction>.json             what was evaluated, how, and the summary
    <dir>/<benchmark>.<model>.<instruction>.responses.jsonl  one line per response (tokens, scores, text)
    <dir>/<benchmark>.<model>.<instruction>.partial.jsonl    while `opsdc eval` runs: its finished samples

`opsdc eval` and `opsdc demo` write them; `opsdc report` reads them. Both files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.models.hf_folder import read_trained_steps

if TYPE_CHECKING:  # annotations only: `opsdc report` reads results without importing torch
    from opsdc_megatron.eval.evaluate import EvalResult, ScoredResponse
    from opsdc_megatron.rollout.engine import SamplingParams

RESPONSES_SUFFIX = ".responses.jsonl"
PARTIAL_SUFFIX = ".partial.jsonl"


@dataclass(frozen=True)
class ResultFile:
    benchmark: str
    model: str
    """Resolved path of the evaluated Hugging Face folder."""
    data: str
    layout: str
    instruction: str
    """'none' (plain prompts) or 'concise' (the instruction prepended)."""
    instruction_text: str | None
    sampling: dict
    seed: int
    engine: str
    result: dict
    """EvalResult.as_dict()."""
    prompts_sha256: str | None = None
    """`prompts_digest` of the prompts as sent (template applied) and their answers; None in older files."""
    prompt_template: str | None = None
    dtype: str | None = None
    batch_prompts: int | None = None
    """Prompts sampled as one batch with one seed: the samples depend on it."""
    run_export: str | None = None
    """best_hf or final_hf when the model was that export of the run whose eval/ folder holds this file:
    the report finds it also after the run folder moved (None in older files, and for other models)."""
    trained_steps: int | None = None
    """A run export's optimizer steps when it was evaluated (`read_trained_steps`); None for other models and in older files."""
    path: Path | None = None


def prompts_digest(records: list) -> str:
    """SHA-256 of the prompts (as sent) and their answers: which problems an evaluation asked, not just how many."""
    return hashlib.sha256(json.dumps([(r.prompt, r.answer) for r in records]).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


RUN_EXPORTS = ("best_hf", "final_hf")
"""The Hugging Face folders a training run writes, best first; their name alone does not say which run."""


def result_stem(benchmark: str, model: Path, instruction: str) -> str:
    """`benchmark.model.instruction`; a run's export is named with its run folder (`run1-best-hf`): a
    second run started from the first's best_hf writes its own best_hf, evaluated into the same folder."""
    name = f"{model.resolve().parent.name}-{model.name}" if model.name in RUN_EXPORTS else model.name
    return f"{_slug(benchmark)}.{_slug(name)}.{instruction}"


def write_result(
    out_dir: Path, benchmark: str, model: Path, data: Path, layout: str, instruction: str,
    instruction_text: str | None, sampling: SamplingParams, seed: int, engine: str, result: EvalResult,
    *, prompts_sha256: str, batch_prompts: int, prompt_template: str = "{problem}", dtype: str = "fp32",
) -> Path:
    """The summary and the responses of one evaluation; returns the summary's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(benchmark, model, instruction)
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in result.responses)
    write_text_atomic(out_dir / f"{stem}{RESPONSES_SUFFIX}", lines)
    run_export = model.name if model.name in RUN_EXPORTS and model.resolve().parent == out_dir.resolve().parent else None
    summary = {
        "benchmark": benchmark, "model": str(model.resolve()), "data": str(data.resolve()), "layout": layout,
        "instruction": instruction, "instruction_text": instruction_text, "sampling": asdict(sampling),
        "seed": seed, "engine": engine, "result": result.as_dict(),
        "prompts_sha256": prompts_sha256, "prompt_template": prompt_template, "dtype": dtype, "batch_prompts": batch_prompts,
        "run_export": run_export, "trained_steps": read_trained_steps(model),
    }
    path = out_dir / f"{stem}.json"
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


def read_results(directory: Path) -> list[ResultFile]:
    """Every result summary in a folder (not recursive), sorted by file name."""
    results = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            results.append(ResultFile(**json.loads(path.read_text(encoding="utf-8")), path=path))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}: not an evaluation result file ({error})") from None
    return results


def read_responses(result: ResultFile) -> list[dict]:
    path = result.path.with_name(result.path.name.removesuffix(".json") + RESPONSES_SUFFIX)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class SampleStore:
    """The finished samples of one evaluation pass, kept until the command's result files are all written.

    A long evaluation (k samples of 30K-token responses) that is interrupted resumes with the samples
    it has (their texts scored again, by the scorer of the run that resumes): sample s is drawn with seed + s,
    so the result is the one an uninterrupted run gives. The
    first line holds `key` (what was evaluated and how); a file with another key is another
    evaluation's, and is started over (`opsdc eval` first refuses one of other settings). A sample is one line, appended and synced; a line cut short
    by a crash is dropped.
    """

    def __init__(self, path: Path, key: dict) -> None:
        self.path, self.key = path, json.loads(json.dumps(key))  # as it reads back (tuples become lists)

    def recorded_key(self) -> dict | None:
        """The key of the samples on disk (None: no file, or no readable key)."""
        if not self.path.is_file():
            return None
        with self.path.open(encoding="utf-8") as file:
            key = _json_or_none(file.readline())
        return key if isinstance(key, dict) else None

    def finished(self) -> dict[int, list[ScoredResponse]]:
        from opsdc_megatron.eval.evaluate import ScoredResponse

        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        if not lines or _json_or_none(lines[0]) != self.key:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.key) + "\n")
            return {}
        entries = [_json_or_none(line) for line in lines[1:]]
        if None in entries:  # a line cut by a crash: keep the others, so that the next append starts a line of its own
            entries = [entry for entry in entries if entry is not None]
            write_text_atomic(self.path, "".join(json.dumps(line) + "\n" for line in [self.key, *entries]))
        return {entry["sample"]: [ScoredResponse(**r) for r in entry["responses"]] for entry in entries}

    def save(self, sample: int, responses: list[ScoredResponse]) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"sample": sample, "responses": [asdict(r) for r in responses]}) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
