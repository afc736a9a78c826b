"""Evaluation result files: one JSON summary per (benchmark, model, instruction) and its scored responses.

    <dir>/<benchmark>.<model>.<instruction>.json             what was evaluated, how, and the summary
    <dir>/<benchmark>.<model>.<instruction>.responses.jsonl  one line per response (tokens, scores, text)

`opsdc eval` and `opsdc demo` write them; `opsdc report` reads them. Both files are written atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from opsdc_megatron.files import write_text_atomic

if TYPE_CHECKING:  # annotations only: `opsdc report` reads results without importing torch
    from opsdc_megatron.eval.evaluate import EvalResult
    from opsdc_megatron.rollout.engine import SamplingParams

RESPONSES_SUFFIX = ".responses.jsonl"


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
    path: Path | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def write_result(
    out_dir: Path, benchmark: str, model: Path, data: Path, layout: str, instruction: str,
    instruction_text: str | None, sampling: SamplingParams, seed: int, engine: str, result: EvalResult,
) -> Path:
    """The summary and the responses of one evaluation; returns the summary's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(benchmark)}.{_slug(model.name)}.{instruction}"
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in result.responses)
    write_text_atomic(out_dir / f"{stem}{RESPONSES_SUFFIX}", lines)
    summary = {
        "benchmark": benchmark, "model": str(model.resolve()), "data": str(data.resolve()), "layout": layout,
        "instruction": instruction, "instruction_text": instruction_text, "sampling": asdict(sampling),
        "seed": seed, "engine": engine, "result": result.as_dict(),
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
