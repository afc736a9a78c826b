"""`opsdc eval`: mean@k accuracy (dual-path scoring) and response length of a model on a benchmark file.

    opsdc eval --model RUN/best_hf --data math500/test.jsonl --samples 8 --temperature 0.6 \
        --top-p 0.95 --top-k 20 --max-tokens 30000 --instruction both --out RUN/eval

The defaults are the paper's evaluation settings (FACTS section 1). The model is a Hugging Face
folder (a run's best_hf/ or final_hf/ is one); the data is a local file in a published layout
(eval/datasets.py). Results go to --out as result files (eval/results.py) that `opsdc report` reads.
The generation backend is any RolloutEngine, picked by --engine.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from opsdc_megatron.config import PAPER_INSTRUCTION_V1
from opsdc_megatron.eval.datasets import LAYOUTS, load_dataset_file

if TYPE_CHECKING:
    from opsdc_megatron.eval.evaluate import EvalResult

ENGINES = ("hf",)
"""Rollout backends `opsdc eval` can start (eval.evaluate.make_engine builds them)."""

INSTRUCTIONS = ("none", "concise", "both")


class ModelFolderError(ValueError):
    """--model is not a Hugging Face folder; names what was found and what is expected."""


def check_hf_folder(path: Path) -> None:
    """A Hugging Face folder has config.json, *.safetensors and a tokenizer; say what else `path` looks like."""
    if not path.is_dir():
        raise ModelFolderError(f"--model {path}: not a folder")
    expected = "a Hugging Face folder (config.json, *.safetensors, tokenizer files), e.g. a run's best_hf/ or final_hf/"
    if (path / "config.yaml").is_file() and ((path / "best_hf").is_dir() or (path / "final_hf").is_dir()):
        raise ModelFolderError(f"--model {path}: this is a training run folder; expected {expected}: pass {path / 'best_hf'} or {path / 'final_hf'}")
    if (path / "latest").exists() or (path / ".metadata").exists() or list(path.glob("step_*")):
        raise ModelFolderError(f"--model {path}: this is a megatron distributed checkpoint; expected {expected} (convert it to Hugging Face first)")
    missing = [name for name, ok in (
        ("config.json", (path / "config.json").is_file()),
        ("*.safetensors", any(path.glob("*.safetensors"))),
        ("tokenizer.json or tokenizer_config.json", (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()),
    ) if not ok]
    if missing:
        raise ModelFolderError(f"--model {path}: missing {', '.join(missing)}; expected {expected}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="mean@k accuracy and response length on a benchmark file (dual-path scoring)")
    parser.add_argument("--model", required=True, help="Hugging Face folder, e.g. RUN/best_hf")
    parser.add_argument("--data", required=True, help="benchmark file: .jsonl or .parquet in a published layout")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="data layout (default: detected from the first row)")
    parser.add_argument("--name", default=None, help="benchmark name in results and reports (default: from the layout, else the file name)")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt, k of mean@k (default 8)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=20, help="0 disables top-k")
    parser.add_argument("--max-tokens", type=int, default=30000, help="response token budget (default 30000)")
    parser.add_argument("--instruction", default="none", choices=INSTRUCTIONS, help="plain prompts, the concise instruction prepended, or both")
    parser.add_argument("--instruction-text", default=PAPER_INSTRUCTION_V1, help="the concise instruction (default: the paper's v1)")
    parser.add_argument("--prompt-template", default="{problem}",
                        help="user message around each problem, with {problem} where it goes (default: the problem alone)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--seed", type=int, default=0, help="sample s of every prompt is drawn with seed + s")
    parser.add_argument("--batch-prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--engine", default="hf", choices=ENGINES, help="rollout backend (default hf: in-process transformers)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--out", default="eval_results", help="folder for result files (default eval_results/)")
    parser.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> None:
    try:
        for flag, value in (("--samples", args.samples), ("--max-tokens", args.max_tokens), ("--batch-prompts", args.batch_prompts), ("--limit", args.limit or 1)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if "{problem}" not in args.prompt_template:
            raise ValueError(f"--prompt-template must contain {{problem}}, got {args.prompt_template!r}")
        model, data = Path(args.model), Path(args.data)
        check_hf_folder(model)
        layout, records = load_dataset_file(data, args.layout)
    except ValueError as error:
        print(f"opsdc eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    import torch
    from rich.console import Console

    from opsdc_megatron.eval.evaluate import evaluate_model
    from opsdc_megatron.eval.results import write_result
    from opsdc_megatron.rollout.engine import SamplingParams

    records = [replace(r, prompt=args.prompt_template.replace("{problem}", r.prompt)) for r in records[: args.limit]]
    benchmark = args.name or layout.benchmark or data.stem
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_tokens)
    names = ("none", "concise") if args.instruction == "both" else (args.instruction,)
    instructions = {name: (args.instruction_text if name == "concise" else None) for name in names}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    results = evaluate_model(model, records, instructions, sampling, args.seed, args.batch_prompts, args.samples, args.engine, dtype)
    out = Path(args.out)
    for name, result in results.items():
        path = write_result(out, benchmark, model, data, layout.name, name, instructions[name], sampling, args.seed, args.engine, result)
        print_result(f"{benchmark}, {model.name}, instruction {name}: mean@{args.samples}", result)
        Console().print(f"wrote {path}")


def print_result(title: str, result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    for column in ("prompts", "accuracy", "Answer-line only", "boxed only", "mean tokens", "median", "p90", "truncated"):
        table.add_column(column)
    table.add_row(
        str(result.n), f"{result.accuracy:.3f}", f"{result.accuracy_answer_line:.3f}", f"{result.accuracy_boxed:.3f}",
        f"{result.mean_tokens:.1f}", f"{result.median_tokens:.0f}", f"{result.p90_tokens:.0f}", f"{result.truncated:.3f}",
    )
    console.print(table)
    if result.per_level:
        levels = Table(title="per level")
        for column in ("level", "prompts", "accuracy", "mean tokens"):
            levels.add_column(column)
        for level, row in result.per_level.items():
            levels.add_row(level, str(row["n"]), f"{row['accuracy']:.3f}", f"{row['mean_tokens']:.1f}")
        console.print(levels)
