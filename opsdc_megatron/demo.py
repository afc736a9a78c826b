"""`opsdc demo`: the embedded default. A tiny Qwen3 learns, by OPSDC on megatron-core at TP=2 on
CPU, to answer toy arithmetic problems concisely without losing accuracy.

1. build (or load from the cache) the toy base model: verbose on plain prompts, concise when told;
2. write toy prompt files: train, validation (best-checkpoint selection), test (before/after);
3. evaluate the base model on test prompts, plain and instructed, sampled with the recipe's eval settings (temperature 1);
4. run `opsdc train recipes/toy_cpu.yaml` in 2 processes (TP=2);
5. evaluate the best checkpoint the same way; print the table, write summary.json and the run's report.

The before/after evaluations are written as result files in <out>/train/eval/ (what `opsdc eval`
writes), from which <out>/train/report.md is rendered (`opsdc report`); `opsdc eval --data
<out>/data/test.jsonl` with the same settings, `--batch-prompts 16` included (samples are drawn per
block of prompts), reproduces the numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opsdc_megatron.eval.evaluate import evaluate_model
from opsdc_megatron.eval.results import prompts_digest, write_result
from opsdc_megatron.files import check_output_folder, write_text_atomic
from opsdc_megatron.prompts import write_prompts
from opsdc_megatron.report import write_report
from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.signals import signals_handled
from opsdc_megatron.toy.base_model import BuildSettings, base_model_folder, ensure_base_model, make_config
from opsdc_megatron.toy.tokenizer import build_toy_tokenizer
from opsdc_megatron.toy.task import toy_prompts

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy_cpu.yaml"
DATA_SEED = 7
TRAIN_PROMPTS, VALIDATION_PROMPTS, TEST_PROMPTS = 4096, 128, 300
TEST_SEED = 424_242
BENCHMARK = "toy test"
RESULT_INSTRUCTION = {"plain": "none", "instructed": "concise"}
"""The demo's names for its two evaluations -> the instruction names of result files (`opsdc eval --instruction`)."""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opsdc-megatron"


def print_table(summary: dict) -> None:
    table = Table(title="OPSDC on the toy task (held-out test prompts, one sample each at temperature 1)")
    for column in ("prompts", "model", "accuracy", "mean tokens", "n"):
        table.add_column(column)
    for kind in ("plain", "instructed"):
        for when in ("before", "after"):
            r = summary[when][kind]
            table.add_row(kind, when, f"{r['accuracy']:.3f}", f"{r['mean_tokens']:.1f}", str(r["n"]))
    Console().print(table)
    before, after = summary["before"]["plain"], summary["after"]["plain"]
    Console().print(
        f"plain prompts: {summary['compression_pct']:.1f}% fewer response tokens "
        f"({before['mean_tokens']:.1f} -> {after['mean_tokens']:.1f}), accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}"
    )


def _recipe_paths(out: Path) -> list[str]:
    data = out / "data"
    return [f"out_dir={out / 'train'}", f"data.train_prompts={data / 'train.jsonl'}", f"data.eval_prompts={data / 'validation.jsonl'}"]


DEMO_KEYS = ("out_dir", "model.hf_path", "data.train_prompts", "data.eval_prompts")
"""Recipe keys the demo sets itself: overridden, training would leave the folders the evaluations read."""


def check_demo_inputs(out: Path, cache: Path, overrides: list[str] = (), base_settings: BuildSettings | None = None) -> None:
    """What `run_demo` would refuse late (after the ~7-minute base model): the recipe with these
    overrides, its parallel layout against the toy model, the SGLang environment it would start, and a
    run in `out` trained from another base model (the toy's code or settings changed since), which a
    rerun would resume and compare with the new one.

    Raises:
        ConfigError, ValueError: naming the key, the folder or the model field.
    """
    from opsdc_megatron.config import load_config, read_saved_config
    from opsdc_megatron.models.hf_config import check_hf_config
    from opsdc_megatron.train.run_folder import complete_checkpoints

    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in DEMO_KEYS or any(demo_key.startswith(f"{key}.") for demo_key in DEMO_KEYS):  # also `data={...}`
            raise ValueError(f"{override}: the demo sets {', '.join(DEMO_KEYS)} itself (its folders: --out, --cache)")
    check_output_folder(out, "--out")
    check_output_folder(cache, "--cache")
    recipe = load_config(RECIPE, [*_recipe_paths(out), "model.hf_path=the toy base model", *overrides])
    saved = out / "train" / "config.yaml"
    base = os.path.abspath(base_model_folder(cache, settings=base_settings))
    resumable = complete_checkpoints(out / "train" / "checkpoints")
    # The folder's name is the base model's cache key; the cache itself may be another (a relative --cache from elsewhere).
    if resumable and saved.is_file() and Path(trained_from := read_saved_config(saved)["model"]["hf_path"]).name != Path(base).name:
        raise ValueError(
            f"{out / 'train'} holds a run trained from {trained_from}, and the demo's base model is now {base} (the toy's code or "
            f"settings changed since): a rerun would resume that run and compare it with the new base model; remove {out}, or give another --out"
        )
    check_hf_config(
        make_config(base_settings or BuildSettings(), build_toy_tokenizer()), recipe.parallel.tensor_parallel_size,
        recipe.parallel.pipeline_parallel_size, recipe.parallel.virtual_pipeline_chunks,
    )
    from opsdc_megatron.launch.plan import check_sglang_servers_to_start

    check_sglang_servers_to_start(recipe)


def run_training(command: list[str]) -> None:
    """`opsdc train` as a child process. SIGTERM and SIGHUP to the demo reach it as SIGTERM (it checkpoints
    and exits 75) and end the demo once it has, with 128 + the signal: ended outright, the demo left it
    training into the run folder, where a rerun started a second trainer.

    Raises:
        subprocess.CalledProcessError: it failed.
    """
    received: list[int] = []
    with subprocess.Popen(command) as child:

        def pass_on(signum: int, _frame) -> None:
            received.append(signum)
            child.send_signal(signal.SIGTERM)

        with signals_handled((signal.SIGTERM, signal.SIGHUP), pass_on):
            status = child.wait()
    if received:
        sys.exit(128 + received[0])
    if status:
        raise subprocess.CalledProcessError(status, command)


def run_demo(
    out: Path, cache: Path | None = None, overrides: list[str] = (), test_prompts: int = TEST_PROMPTS, base_settings: BuildSettings | None = None
) -> dict:
    """`overrides` go to the training recipe (and its eval settings); the smaller sizes serve the smoke test.
    `opsdc demo` runs `check_demo_inputs` first.

    Raises:
        subprocess.CalledProcessError: `opsdc train` failed (it printed why).
    """
    from opsdc_megatron.config import load_config

    console = Console()
    console.rule("1. toy base model")
    base = ensure_base_model(cache or default_cache(), settings=base_settings)
    console.print(f"base model: {base}")

    console.rule("2. toy prompts")
    data = out / "data"
    heldout = toy_prompts(DATA_SEED, VALIDATION_PROMPTS + test_prompts, "heldout")
    write_prompts(data / "train.jsonl", toy_prompts(DATA_SEED, TRAIN_PROMPTS, "train"))
    write_prompts(data / "validation.jsonl", heldout[:VALIDATION_PROMPTS])
    test = heldout[VALIDATION_PROMPTS:]
    write_prompts(data / "test.jsonl", test)

    overrides = [*_recipe_paths(out), f"model.hf_path={base}", *overrides]
    recipe = load_config(RECIPE, overrides)
    sampling = SamplingParams(recipe.eval.temperature, recipe.eval.top_p, recipe.eval.top_k, recipe.eval.max_response_tokens)
    instructions = {"plain": None, "instructed": recipe.distill.instruction}

    def evaluate_and_record(model: Path) -> dict:
        results = evaluate_model(model, test, instructions, sampling, TEST_SEED, recipe.rollout.generation_batch_prompts)
        for kind, result in results.items():
            write_result(out / "train" / "eval", BENCHMARK, model, data / "test.jsonl", "opsdc", RESULT_INSTRUCTION[kind],
                         instructions[kind], sampling, TEST_SEED, "hf", result, prompts_sha256=prompts_digest(test),
                         batch_prompts=recipe.rollout.generation_batch_prompts)
        return results

    console.rule("3. evaluate the base model")
    before = evaluate_and_record(base)

    console.rule("4. OPSDC with megatron-core, TP=2, 2 CPU processes")
    run_training([sys.executable, "-m", "opsdc_megatron.cli", "train", str(RECIPE), *overrides])

    console.rule("5. evaluate the best checkpoint")
    best = out / "train" / "best_hf"
    if not best.exists():
        best = out / "train" / "final_hf"
    after = evaluate_and_record(best)
    summary = {
        "before": {k: {"accuracy": r.accuracy, "mean_tokens": r.mean_tokens, "n": r.n} for k, r in before.items()},
        "after": {k: {"accuracy": r.accuracy, "mean_tokens": r.mean_tokens, "n": r.n} for k, r in after.items()},
    }
    summary["compression_pct"] = 100 * (1 - summary["after"]["plain"]["mean_tokens"] / summary["before"]["plain"]["mean_tokens"])
    summary["best_checkpoint"] = str(best)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    report = write_report(out / "train")
    print_table(summary)
    console.print(f"wrote {out / 'summary.json'}, {report} and its plots")
    return summary
