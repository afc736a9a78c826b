"""Prompts: the first stage of the data path.

A prompt file is JSON Lines, one record per line: {"prompt": str, "answer": str, ...}. Extra fields
(level, source) are kept. The student sees the prompt as the user turn of the tokenizer's chat
template; the teacher sees the conciseness instruction, a blank line, then the same prompt (the
paper prepends the instruction to the user prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase


class PromptFileError(ValueError):
    """A prompt file that cannot be read: names the file and line."""


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


def read_json_objects(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file; a bad line raises PromptFileError naming file:line."""
    rows = []
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as error:
                raise PromptFileError(f"{path}:{line_number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # a line cut short fails at its end, not at column 1 of the next
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_number, row))
    return rows


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a JSON Lines prompt file; a bad line raises PromptFileError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    records = []
    for line_number, row in read_json_objects(path):
        for key, kinds in (("prompt", (str,)), ("answer", (str, int))):  # an integer answer, as the benchmarks' loaders take it
            if isinstance(row.get(key), bool) or not isinstance(row.get(key), kinds):
                got = "missing" if key not in row else type(row[key]).__name__
                raise PromptFileError(f"{path}:{line_number}: field '{key}' must be a string{' or an integer' if int in kinds else ''}, got {got}")
            surrogate = unpaired_surrogate(str(row[key]))
            if surrogate:
                raise PromptFileError(f"{path}:{line_number}: field '{key}' {surrogate}")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        records.append(PromptRecord(row["prompt"], str(row["answer"]), extra))
    if not records:
        raise PromptFileError(f"{path}: no prompts")
    return records


def unpaired_surrogate(text: str) -> str | None:
    """'holds an unpaired surrogate \\udXXX' when `text` has one, else None: JSON admits such an escape,
    but UTF-8 and the tokenizer do not (it failed only when the prompt was encoded, after the model loaded)."""
    surrogates = [char for char in text if 0xD800 <= ord(char) <= 0xDFFF]
    return f"holds an unpaired surrogate \\u{ord(surrogates[0]):04x}" if surrogates else None


def write_prompts(path: str | Path, records: list[PromptRecord]) -> None:
    """Write records as JSON Lines atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({**record.extra, "prompt": record.prompt, "answer": record.answer}) + "\n")
    tmp.replace(path)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a Hugging Face folder, checked for what OPSDC needs from it.

    Prompts are formatted with its chat template, so one must exist. Without a pad token (Llama 3's
    tokenizers have none) the end-of-sequence token pads: padding is masked wherever it is used.
    """
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        # transformers 5 then builds an empty tokenizer from config.json, which failed later for another reason
        raise PromptFileError(f"{model_dir}: no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model); copy the base model's")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise PromptFileError(
            f"{model_dir}: the tokenizer has no chat template (chat_template in tokenizer_config.json, or "
            "chat_template.jinja); prompts are formatted with it: use an instruct or reasoning model's folder, or add one"
        )
    if tokenizer.eos_token_id is None:
        raise PromptFileError(f"{model_dir}: the tokenizer has no end-of-sequence token (eos_token); rollouts stop at it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where a response ends, as transformers' generate decides it: the tokenizer's end-of-sequence token
    and those listed in generation_config.json (Qwen3 lists <|im_end|> and <|endoftext|>, Llama 3
    Instruct <|eot_id|> besides <|end_of_text|>); a response running past one of them would be trained on."""
    ids = [tokenizer.eos_token_id]
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            listed = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})") from None
        ids += listed if isinstance(listed, list) else [] if listed is None else [listed]
    return list(dict.fromkeys(ids))


TASK_HEADERS = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.",
)
"""Headers a prompt may open with that say how to answer: DAPO-Math-17k's. The teacher's instruction takes their
place (it carries the same answer-format line), as in the paper's teacher prompt: `c`, the problem, DAPO's closing
`Remember to put your answer ...` line. Prepended to the header, it told the teacher "concisely" then "step by step"."""


def user_message(prompt: str, instruction: str | None = None) -> str:
    """The user turn: the prompt, with the teacher's instruction in place of its task header (`TASK_HEADERS`) or,
    without one, prepended."""
    if not instruction:
        return prompt
    header = next((header for header in TASK_HEADERS if prompt.startswith(header)), "")
    return f"{instruction}\n\n{prompt[len(header):].lstrip()}"


CHAT_TEMPLATE_DATE = "26 Jul 2024"
"""The `date_string` given to chat templates: Llama 3.1/3.2's write today's date into every prompt otherwise
(transformers' `strftime_now`), and a run resumed, or an eval finished, on another day would sample from
other prompt tokens. This is those templates' own fallback date."""


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, instruction: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending where the model's response begins."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(prompt, instruction)}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        date_string=CHAT_TEMPLATE_DATE,
    )
    return list(ids)


def prompt_opens_reasoning(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template leaves a reasoning block open where the response begins (its generation prompt
    ends with `<think>`): the scorer must then read a response as starting inside it (`eval.scoring.final_part`)."""
    from opsdc_megatron.eval.scoring import opens_reasoning

    return opens_reasoning(tokenizer.decode(encode_prompt(tokenizer, "")))
