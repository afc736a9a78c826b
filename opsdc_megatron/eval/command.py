"""`opsdc eval`: mean@k accuracy (dual-path scoring) and response length of a model on a benchmark file.

    opsdc eval --model RUN/best_hf --data math500/test.jsonl --samples 8 --temperature 0.6 \
        --top-p 0.95 --top-k 20 --max-tokens 30000 --instruction both --out RUN/eval

The defaults are the paper's evaluation settings (FACTS section 1). The model is a Hugging Face
folder (a run's best_hf/ or final_hf/ is one) or a megatron torch_dist checkpoint (a run's
checkpoints/, i.e. the step its `latest` marker names, a checkpoints/step_N, or an `opsdc convert
hf-to-megatron` output): a checkpoint is exported by the converter (`opsdc convert megatron-to-hf`,
the same code and the same config lookup, --hf-config) to a temporary Hugging Face folder, which is
evaluated and then removed. The data is a local file in a published layout (eval/datasets.py).
Results go to --out as result files (eval/results.py) that `opsdc report` reads. The generation
backend is any RolloutEngine, picked by --engine: hf (in-process transformers) or sglang (SGLang
servers from .venv-sglang, started on the folder for this command and stopped after it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from typing import TYPE_CHECKING

from opsdc_megatron.config import PAPER_INSTRUCTION_V1
from opsdc_megatron.eval.datasets import LAYOUTS, load_dataset_file
from opsdc_megatron.files import check_output_folder
from opsdc_megatron.prompts import load_tokenizer
from opsdc_megatron.signals import signals_handled

if TYPE_CHECKING:
    from opsdc_megatron.eval.evaluate import EvalResult

ENGINES = ("hf", "sglang")
"""Rollout backends `opsdc eval` can start (eval.evaluate.make_engine builds them)."""

INSTRUCTIONS = ("none", "concise", "both")


EXPECTED_MODEL = (
    "a Hugging Face folder (config.json, *.safetensors, tokenizer files), e.g. a run's best_hf/ or final_hf/, "
    "or a megatron checkpoint (a run's checkpoints/ or checkpoints/step_N)"
)


class ModelFolderError(ValueError):
    """--model is neither a Hugging Face folder nor a megatron checkpoint; names what was found and what is expected."""


def _missing_hf_files(path: Path, weights: bool) -> list[str]:
    return [name for name, ok in (
        ("config.json", (path / "config.json").is_file()),
        ("*.safetensors", not weights or any(path.glob("*.safetensors"))),
        ("tokenizer.json or tokenizer_config.json", (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()),
    ) if not ok]


def _stored_in_bf16(model: Path, checkpoint: Path | None) -> bool:
    """Whether the weights are stored in bf16: a megatron checkpoint's own tensors (its export keeps their dtype,
    whatever the base model's config.json says), else config.json's `dtype` (transformers 4: `torch_dtype`)."""
    if checkpoint is not None:
        import torch

        from opsdc_megatron.convert.megatron_to_hf import checkpoint_dtype

        return checkpoint_dtype(checkpoint) == torch.bfloat16
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    return (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"


def check_model_folder(path: Path) -> None:
    """A Hugging Face folder has config.json, *.safetensors matching it and a tokenizer; say what else `path` looks like."""
    if not path.is_dir():
        raise ModelFolderError(f"--model {path}: not a folder")
    if (path / "config.yaml").is_file() and ((path / "best_hf").is_dir() or (path / "final_hf").is_dir() or (path / "checkpoints").is_dir()):
        present = [str(path / name) for name in ("best_hf", "final_hf", "checkpoints") if (path / name).is_dir()]
        raise ModelFolderError(f"--model {path}: this is a training run folder; expected {EXPECTED_MODEL}: pass {' or '.join(present)}")
    missing = _missing_hf_files(path, weights=True)
    if missing:
        raise ModelFolderError(f"--model {path}: missing {', '.join(missing)}; expected {EXPECTED_MODEL}")
    from opsdc_megatron.convert.checks import check_hf_folder

    try:  # weights (headers only) that match the config: a shard missing, cut short, or another model's config
        check_hf_folder(path)
    except ValueError as error:
        raise ModelFolderError(f"--model {error}") from None


def find_megatron_checkpoint(path: Path) -> Path | None:
    """The torch_dist checkpoint `path` names (itself, or the step its `latest` marker names); None if it looks like none.

    Raises:
        ModelFolderError: a checkpoints folder without a usable `latest` marker, or a folder that is not torch_dist.
    """
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    from opsdc_megatron.convert.checks import DIST_CHECKPOINT_METADATA, check_megatron_checkpoint
    from opsdc_megatron.train.run_folder import LATEST, latest_checkpoint

    if (path / LATEST).is_file():
        try:
            checkpoint = latest_checkpoint(path)
        except FileNotFoundError as error:
            raise ModelFolderError(f"--model {path}: {error}") from None
    elif (path / DIST_CHECKPOINT_METADATA).is_file() or (path / ".metadata").is_file():
        checkpoint = path
    elif any(p.is_dir() for p in path.glob("step_*")):
        raise ModelFolderError(f"--model {path}: a checkpoints folder without a {LATEST!r} marker; pass one of its step_N folders")
    else:
        return None
    try:
        check_megatron_checkpoint(checkpoint)
    except ValueError as error:
        raise ModelFolderError(f"--model {path}: {error}") from None
    return checkpoint


def checkpoint_hf_config(checkpoint: Path, hf_config: Path | None) -> Path:
    """The folder with the checkpoint's config.json and tokenizer: --hf-config, else the converter's lookup."""
    from opsdc_megatron.convert.megatron_to_hf import find_hf_config

    folder = hf_config or find_hf_config(checkpoint)
    missing = _missing_hf_files(folder, weights=False)
    if missing:
        raise ModelFolderError(f"{'--hf-config ' if hf_config else ''}{folder} (config of checkpoint {checkpoint}): missing {', '.join(missing)}")
    return folder


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="mean@k accuracy and response length on a benchmark file (dual-path scoring)")
    parser.add_argument("--model", required=True, help="Hugging Face folder (e.g. RUN/best_hf) or megatron checkpoint (RUN/checkpoints[/step_N])")
    parser.add_argument("--hf-config", type=Path, default=None,
                        help="for a megatron checkpoint: folder with its config.json and tokenizer (default: as `opsdc convert megatron-to-hf` finds it)")
    parser.add_argument("--data", required=True, help="benchmark file: .jsonl or .parquet in a published layout")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="data layout (default: detected from the first row)")
    parser.add_argument("--name", default=None, help="benchmark name in results and reports (default: from the layout, else the file name)")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt, k of mean@k (default 8)")
    parser.add_argument("--temperature", type=float, default=0.6, help="default: 0.6, the paper's evaluation sampling")
    parser.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    parser.add_argument("--top-k", type=int, default=20, help="default: 20; 0 disables top-k")
    parser.add_argument("--max-tokens", type=int, default=30000, help="response token budget (default 30000)")
    parser.add_argument("--instruction", default="none", choices=INSTRUCTIONS, help="plain prompts, the concise instruction prepended, or both")
    parser.add_argument("--instruction-text", default=PAPER_INSTRUCTION_V1, help="the concise instruction (default: the paper's v1)")
    parser.add_argument("--prompt-template", default="{problem}",
                        help="user message around each problem, with {problem} where it goes (default: the problem alone)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--seed", type=int, default=0,
                        help="sample s of every prompt is drawn with seed + s (sglang: reproducible on GPUs only, where servers run deterministic inference)")
    parser.add_argument("--batch-prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--engine", default="hf", choices=ENGINES, help="rollout backend (default hf: in-process transformers; sglang: SGLang servers)")
    # The --sglang-* defaults are applied in sglang_server_options: None here tells a flag given to another engine
    parser.add_argument("--sglang-servers", type=int, help="--engine sglang: servers started (default 1)")
    parser.add_argument("--sglang-base-port", type=int, help="--engine sglang: server i listens on this port + i (default 30000)")
    parser.add_argument("--sglang-python", help="--engine sglang: interpreter of the SGLang environment (default .venv-sglang/bin/python)")
    parser.add_argument("--sglang-tp", type=int, help="--engine sglang: GPUs per server (tensor parallel; default 1)")
    parser.add_argument("--sglang-mem-fraction", type=float,
                        help="--engine sglang: SGLang's --mem-fraction-static, the GPU memory share for weights and KV cache (default SGLang's)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="dtype the model samples in (default auto: bf16 on a GPU for a model stored in bf16, else fp32)")
    parser.add_argument("--out", default="eval_results", help="folder for result files (default eval_results/)")
    parser.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> None:
    import torch

    try:
        for flag, value in (
            ("--samples", args.samples), ("--max-tokens", args.max_tokens), ("--batch-prompts", args.batch_prompts), ("--limit", args.limit if args.limit is not None else 1),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise ValueError(f"--temperature must be >= 0, --top-p in (0, 1] and --top-k >= 0, got {args.temperature}, {args.top_p}, {args.top_k}")
        if "{problem}" not in args.prompt_template:
            raise ValueError(f"--prompt-template must contain {{problem}}, got {args.prompt_template!r}")
        if args.instruction != "none" and not args.instruction_text.strip():
            raise ValueError(f"--instruction {args.instruction} needs an instruction, but --instruction-text is empty")
        model, data = Path(args.model), Path(args.data)
        check_output_folder(Path(args.out), "--out")
        checkpoint = find_megatron_checkpoint(model)
        if checkpoint is None:
            check_model_folder(model)
            if args.hf_config is not None:
                raise ValueError(f"--hf-config is for a megatron checkpoint; --model {model} is a Hugging Face folder")
        hf_config = checkpoint_hf_config(checkpoint, args.hf_config) if checkpoint is not None else None
        if args.dtype == "auto":  # 8B+ models in fp32 leave a GPU little room for the KV cache; CPUs sample bf16 slowly
            args.dtype = "bf16" if _stored_in_bf16(model, checkpoint) and torch.cuda.is_available() else "fp32"
        load_tokenizer(hf_config or model)  # has a chat template and an end-of-sequence token
        server_options = sglang_server_options(args)
        layout, records = load_dataset_file(data, args.layout)
    except ValueError as error:
        print(f"opsdc eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    from rich.console import Console

    from opsdc_megatron.eval.evaluate import evaluate_model
    from opsdc_megatron.eval.results import PARTIAL_SUFFIX, SampleStore, prompts_digest, result_stem, write_result
    from opsdc_megatron.rollout.engine import SamplingParams

    records = [replace(r, prompt=args.prompt_template.replace("{problem}", r.prompt)) for r in records[: args.limit]]
    benchmark = args.name or layout.benchmark or data.stem
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_tokens)
    names = ("none", "concise") if args.instruction == "both" else (args.instruction,)
    instructions = {name: (args.instruction_text if name == "concise" else None) for name in names}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out, evaluated, digest = Path(args.out), checkpoint or model, prompts_digest(records)
    # What a result file records of its evaluation (with the instruction): another result of the same name is not replaced.
    settings = {
        "model": str(evaluated.resolve()), "data": str(data.resolve()), "sampling": asdict(sampling), "seed": args.seed,
        "batch_prompts": args.batch_prompts, "engine": args.engine, "dtype": args.dtype,
    }
    # What a pass's finished samples were drawn from: an interrupted run resumes with them only if all of it is the same.
    run_key = {
        **settings, "model_files": _files_signature(evaluated), "prompts": digest,
        "hf_config_files": _files_signature(hf_config) if hf_config is not None else None,
    }

    def store_for(name: str) -> SampleStore:
        return SampleStore(out / f"{result_stem(benchmark, evaluated, name)}{PARTIAL_SUFFIX}", {**run_key, "instruction_text": instructions[name]})

    for name in names:  # another evaluation's results of the same name (other settings, two test.jsonl files) stay
        previous = out / f"{result_stem(benchmark, evaluated, name)}.json"
        try:
            recorded = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
            if not isinstance(recorded, dict):
                raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            print(f"opsdc eval: error: {previous}: not an evaluation result file ({error}); remove it or give another --out", file=sys.stderr)
            sys.exit(2)
        planned = {**settings, "prompts_sha256": digest, "instruction_text": instructions[name]}
        differ = [key for key, value in planned.items() if key in recorded and recorded[key] != value]
        if recorded.get("result", {}).get("samples_per_prompt", args.samples) != args.samples:
            differ.append("samples")
        if recorded and "prompts_sha256" not in recorded and recorded.get("result", {}).get("n") != len(records):
            differ.append("prompt count")  # a file written before prompts were recorded by digest
        if differ:
            print(f"opsdc eval: error: {previous} holds the evaluation of {recorded.get('model')} on {recorded.get('data')} with other "
                  f"{', '.join(differ)}, which this one ({evaluated} on {data}) would replace: give --name or another --out, or remove it",
                  file=sys.stderr)
            sys.exit(2)
        # ... and so do the samples of one interrupted (those of this model, rewritten since, are of no model left)
        store = store_for(name)
        unfinished = store.recorded_key() or {}
        model_changed = unfinished.get("model") == store.key["model"] and any(
            key in unfinished and unfinished[key] != store.key[key] for key in ("model_files", "hf_config_files")
        )
        differ = [] if model_changed else [key for key, value in store.key.items() if key in unfinished and unfinished[key] != value]
        if differ:
            print(f"opsdc eval: error: {store.path} holds the unfinished evaluation of {unfinished.get('model')} on {unfinished.get('data')} "
                  f"with other {', '.join(differ)}, which this one would start over: rerun that one to finish it, give --name or "
                  f"another --out, or remove it", file=sys.stderr)
            sys.exit(2)
        drawn = sorted(store.finished()) if unfinished == store.key else []
        if drawn and drawn[-1] >= args.samples:  # the result would use the first --samples and the partial file would go
            print(f"opsdc eval: error: {store.path} holds samples {drawn} of this evaluation, unfinished; --samples {args.samples} "
                  f"would keep only those below {args.samples}: rerun with --samples {drawn[-1] + 1} or more, give --name or "
                  f"another --out, or remove it", file=sys.stderr)
            sys.exit(2)

    def save(name: str, result) -> None:  # each pass as it ends: a later pass's failure keeps it
        path = write_result(out, benchmark, evaluated, data, layout.name, name, instructions[name], sampling, args.seed, args.engine, result,
                            prompts_sha256=digest, batch_prompts=args.batch_prompts, prompt_template=args.prompt_template, dtype=args.dtype)
        print_result(f"{benchmark}, {evaluated.name}, instruction {name}: mean@{args.samples}", result)
        Console().print(f"wrote {path}")

    try:
        with exit_on_termination(), folder_to_evaluate(model, checkpoint, hf_config) as model_dir:
            evaluate_model(model_dir, records, instructions, sampling, args.seed, args.batch_prompts, args.samples, args.engine, dtype,
                           server_options, save, store_for)
        for name in names:  # kept until every pass is written: a rerun after a later pass failed redraws nothing of the earlier
            store_for(name).remove()
    except ModelFolderError as error:
        print(f"opsdc eval: error: {error}", file=sys.stderr)
        sys.exit(2)


def _files_signature(folder: Path) -> list[tuple[str, int, int]]:
    """(name, bytes, mtime in ns) of the files in a model folder or checkpoint: changes when it is rewritten."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP (kill, a closed ssh session) end the command as Ctrl-C does, through its cleanup:
    without it the SGLang servers it started (in sessions of their own, out of the signal's reach) kept their
    GPUs and ports, and a checkpoint's temporary export stayed. The exit status is the shell's, 128 + signal."""
    with signals_handled((signal.SIGTERM, signal.SIGHUP), lambda number, _frame: sys.exit(128 + number)):
        yield


@contextmanager
def folder_to_evaluate(model: Path, checkpoint: Path | None, hf_config: Path | None) -> Iterator[Path]:
    """`model` itself, or `checkpoint` exported by the converter to a temporary Hugging Face folder (removed on exit)."""
    if checkpoint is None:
        yield model
        return
    from rich.console import Console

    from opsdc_megatron.convert.checks import ConversionError
    from opsdc_megatron.convert.megatron_to_hf import export_in_this_process

    with tempfile.TemporaryDirectory(prefix="opsdc-eval-") as tmp:
        Console().print(f"exporting {checkpoint} to a temporary Hugging Face folder in {tmp} (config and tokenizer: {hf_config})")
        try:
            folder = export_in_this_process(checkpoint, Path(tmp) / checkpoint.name, hf_config)
        except ConversionError as error:
            raise ModelFolderError(f"--model {checkpoint}: {error}") from None
        yield folder


def sglang_server_options(args: argparse.Namespace) -> dict | None:
    """serve_hf_folder's options from the --sglang-* flags (None for another engine, which refuses them); the
    interpreter must exist."""
    from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON

    flags = {"--sglang-servers": args.sglang_servers, "--sglang-base-port": args.sglang_base_port, "--sglang-python": args.sglang_python,
             "--sglang-tp": args.sglang_tp, "--sglang-mem-fraction": args.sglang_mem_fraction}
    if args.engine != "sglang":
        if given := [flag for flag, value in flags.items() if value is not None]:
            raise ValueError(f"{', '.join(given)}: for --engine sglang, and this evaluation runs --engine {args.engine}")
        return None
    for flag in ("--sglang-servers", "--sglang-tp"):
        if flags[flag] is not None and flags[flag] < 1:
            raise ValueError(f"{flag} must be >= 1, got {flags[flag]}")
    python = args.sglang_python or str(DEFAULT_SGLANG_PYTHON)
    if not Path(python).is_file() and not shutil.which(python):
        raise ValueError(f"--engine sglang: SGLang interpreter {python} not found: run `make env-sglang` or pass --sglang-python")
    if args.sglang_mem_fraction is not None and not 0 < args.sglang_mem_fraction <= 1:
        raise ValueError(f"--sglang-mem-fraction must be in (0, 1], got {args.sglang_mem_fraction}")
    return {
        "num_servers": args.sglang_servers or 1, "base_port": args.sglang_base_port or 30000, "python": python,
        "log_dir": Path(args.out) / "sglang_logs", "tensor_parallel_size": args.sglang_tp or 1, "mem_fraction_static": args.sglang_mem_fraction,
    }


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
