"""Benchmark and training sets in their published layouts, read from local files into PromptRecords.

Supported layouts (column names as published on the Hugging Face hub):

| layout | dataset | fields |
|---|---|---|
| math500 | HuggingFaceH4/MATH-500 (test.jsonl) | problem, solution, answer, subject, level, unique_id |
| aime2024 | Maxwell-Jia/AIME_2024 | ID, Problem, Solution, Answer |
| aime2025 | opencompass/AIME2025 (aime2025-I/II.jsonl; benchmark named by the file); also openai/gsm8k, whose gold is the number after `####` | question, answer |
| problem_answer | HuggingFaceH4/aime_2024, math-ai/aime25 and the like | problem, answer (+ any) |
| dapo | BytedTsinghua-SIA/DAPO-Math-17k (parquet) | data_source, prompt (chat messages), ability, reward_model {ground_truth, style}, extra_info |
| opsdc | this project's prompt files | prompt, answer (+ any) |

Files are JSON Lines (.jsonl) or Parquet (.parquet). The layout is detected from the first row
unless given; every row is checked against it, and a row that does not fit raises
DatasetLayoutError naming the file, the row and the missing, unexpected or mistyped field.
The published DAPO-Math-17k parquet holds each of its ~17.9k prompts about 100 times: a dapo file's
rows are read once per prompt (the first row of a prompt is kept).

`opsdc data split FILE --out DIR` writes a training and a validation prompt file from any of these (the
recipes' `data/dapo_math_17k/{train,validation}.jsonl`: the paper's 80/20 split of DAPO-Math-17k).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from opsdc_megatron.files import check_output_folder
from opsdc_megatron.prompts import PromptFileError, PromptRecord, read_json_objects, unpaired_surrogate, write_prompts


class DatasetLayoutError(PromptFileError):
    """A data file whose rows do not fit the expected layout: names file, row and field."""


@dataclass(frozen=True)
class Layout:
    name: str
    benchmark: str | None
    """Name shown in results and reports; None: the file's name."""
    required: tuple[str, ...]
    open_ended: bool
    """Whether fields beyond the required ones are allowed (kept in PromptRecord.extra)."""
    to_record: Callable[[dict[str, Any], Callable[[str], str]], PromptRecord]
    """Row -> record; the second argument formats an error message with the file and row."""


def _text(row: dict, key: str, where: Callable[[str], str], integers: bool = True) -> str:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int) if integers else str):
        kinds = "a string or an integer" if integers else "a string"
        raise DatasetLayoutError(where(f"field '{key}' must be {kinds}, got {type(value).__name__}"))
    surrogate = unpaired_surrogate(str(value))
    if surrogate:
        raise DatasetLayoutError(where(f"field '{key}' {surrogate}"))
    return str(value)


def _math500(row: dict, where: Callable[[str], str]) -> PromptRecord:
    extra = {"level": row["level"], "subject": row["subject"], "id": row["unique_id"]}
    return PromptRecord(_text(row, "problem", where), _text(row, "answer", where), extra)


def _aime2024(row: dict, where: Callable[[str], str]) -> PromptRecord:
    return PromptRecord(_text(row, "Problem", where), _text(row, "Answer", where), {"id": row["ID"]})


def _aime2025(row: dict, where: Callable[[str], str]) -> PromptRecord:
    """A question/answer file; GSM8K's answer is a worked solution ending `#### 1,234`: the gold is that number."""
    answer = _text(row, "answer", where)
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return PromptRecord(_text(row, "question", where), answer, {})


def _problem_answer(row: dict, where: Callable[[str], str]) -> PromptRecord:
    extra = {k: v for k, v in row.items() if k not in ("problem", "answer", "solution")}
    return PromptRecord(_text(row, "problem", where), _text(row, "answer", where), extra)


def _opsdc(row: dict, where: Callable[[str], str]) -> PromptRecord:
    extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
    return PromptRecord(_text(row, "prompt", where, integers=False), _text(row, "answer", where), extra)


def _dapo(row: dict, where: Callable[[str], str]) -> PromptRecord:
    """The user message as published (it carries DAPO's `Answer:` format lines); gold = reward_model.ground_truth."""
    messages = row["prompt"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DatasetLayoutError(where("field 'prompt' must be a list of chat messages {role, content}"))
    user = [m for m in messages if m["role"] == "user"]
    if len(user) != 1 or not isinstance(user[0]["content"], str):
        raise DatasetLayoutError(where(f"field 'prompt' must hold exactly one user message, got {len(user)}"))
    reward = row["reward_model"]
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
        raise DatasetLayoutError(where("field 'reward_model' must be a mapping with 'ground_truth'"))
    extra_info = row["extra_info"] if isinstance(row["extra_info"], dict) else {}
    extra = {"source": row["data_source"], "id": extra_info.get("index")}
    return PromptRecord(_text(user[0], "content", where, integers=False), _text(reward, "ground_truth", where), extra)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("dapo", "DAPO-Math-17k", ("data_source", "prompt", "ability", "reward_model", "extra_info"), False, _dapo),
        Layout("math500", "MATH-500", ("problem", "solution", "answer", "subject", "level", "unique_id"), False, _math500),
        Layout("aime2024", "AIME 2024", ("ID", "Problem", "Solution", "Answer"), False, _aime2024),
        Layout("aime2025", None, ("question", "answer"), False, _aime2025),  # fields any Q/A file has (GSM8K too): the file names it
        Layout("problem_answer", None, ("problem", "answer"), True, _problem_answer),
        Layout("opsdc", None, ("prompt", "answer"), True, _opsdc),
    )
}
"""In detection order: the first layout whose required fields the first row has wins."""


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(position label, row) pairs: 'line N' for JSON Lines, 'row N' for Parquet (1-based)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path)
        except pyarrow.ArrowException as error:
            raise DatasetLayoutError(f"{path}: not a readable Parquet file ({error})") from None
        return [(f"row {index}", row) for index, row in enumerate(table.to_pylist(), start=1)]
    if path.suffix != ".jsonl":
        raise DatasetLayoutError(f"{path}: unsupported file type '{path.suffix}': expected .jsonl or .parquet")
    return [(f"line {number}", row) for number, row in read_json_objects(path)]


def detect_layout(path: Path, first_row: dict) -> Layout:
    """The first layout the row fits: all its fields, and no others for a closed one (a MATH-500 copy with
    an added column is read as problem_answer, not refused as MATH-500)."""
    for layout in LAYOUTS.values():
        if all(key in first_row for key in layout.required) and (layout.open_ended or set(first_row) == set(layout.required)):
            return layout
    known = "; ".join(f"{l.name}: {', '.join(l.required)}" for l in LAYOUTS.values())
    raise DatasetLayoutError(f"{path}: the first row has fields {sorted(first_row)}, which match no known layout ({known})")


def load_dataset_file(path: str | Path, layout: str = "auto") -> tuple[Layout, list[PromptRecord]]:
    """All rows of a local benchmark or training file as PromptRecords, with the layout they were read in."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: data file not found")
    rows = _read_rows(path)
    if not rows:
        raise DatasetLayoutError(f"{path}: no rows")
    if layout == "auto":
        chosen = detect_layout(path, rows[0][1])
    elif layout in LAYOUTS:
        chosen = LAYOUTS[layout]
    else:
        raise DatasetLayoutError(f"unknown layout {layout!r}: expected auto or one of {', '.join(LAYOUTS)}")
    records = []
    for position, row in rows:
        def where(message: str, position: str = position) -> str:
            return f"{path}: {position}: {message} (layout {chosen.name}: {', '.join(chosen.required)})"

        missing = [key for key in chosen.required if key not in row]
        if missing:
            raise DatasetLayoutError(where(f"missing field '{missing[0]}'"))
        unexpected = sorted(set(row) - set(chosen.required))
        if unexpected and not chosen.open_ended:
            raise DatasetLayoutError(where(f"unexpected field '{unexpected[0]}'"))
        records.append(chosen.to_record(row, where))
    if chosen.name == "dapo":
        records = unique_prompts(records)
    return chosen, records


def unique_prompts(records: list[PromptRecord]) -> list[PromptRecord]:
    """The first record of each prompt text, in file order."""
    seen: set[str] = set()
    unique = []
    for record in records:
        if record.prompt not in seen:
            seen.add(record.prompt)
            unique.append(record)
    return unique


def split_records(records: list[PromptRecord], validation_fraction: float, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, validation): distinct prompts (a prompt in both would make validation measure training),
    shuffled with `seed`, the validation part round(fraction x prompts) of them."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
    shuffled = unique_prompts(records)
    random.Random(seed).shuffle(shuffled)
    validation_size = round(validation_fraction * len(shuffled))
    if not 0 < validation_size < len(shuffled):
        raise ValueError(f"{len(shuffled)} distinct prompts leave no {'validation' if not validation_size else 'training'} "
                         f"prompt at --validation-fraction {validation_fraction}")
    return shuffled[validation_size:], shuffled[:validation_size]


def add_data_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare prompt files").add_subparsers(dest="data_command", required=True)
    split = data.add_parser("split", help="a data file (any layout above) -> DIR/train.jsonl and DIR/validation.jsonl, distinct prompts")
    split.add_argument("source", type=Path, help=".jsonl or .parquet, e.g. DAPO-Math-17k's parquet")
    split.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and validation.jsonl (must not hold them)")
    split.add_argument("--validation-fraction", type=float, default=0.2, help="share of the prompts for validation (default 0.2, the paper's)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--layout", default="auto", help=f"auto (default) or one of {', '.join(LAYOUTS)}")
    split.set_defaults(handler=split_command)


def split_command(args: argparse.Namespace) -> None:
    targets = [args.out / "train.jsonl", args.out / "validation.jsonl"]
    try:
        check_output_folder(args.out, "--out")
        existing = [str(path) for path in targets if path.exists()]
        if existing:
            raise ValueError(f"{', '.join(existing)} already exist: remove them or choose another --out")
        layout, records = load_dataset_file(args.source, args.layout)
        train, validation = split_records(records, args.validation_fraction, args.seed)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--out: {error}") from None
    except ValueError as error:  # PromptFileError included
        print(f"opsdc data split: error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, part in zip(targets, (train, validation)):
        write_prompts(path, part)
    print(f"{args.source} ({layout.name}): {len(train) + len(validation)} distinct prompts -> {len(train)} in {targets[0]}, "
          f"{len(validation)} in {targets[1]} (seed {args.seed})")
