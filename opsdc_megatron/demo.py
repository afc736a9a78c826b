"""`opsdc demo`: the embedded default. A tiny Qwen3 learns, by OPSDC on megatron-core at TP=2 on
CPU, to answer toy arithmetic problems concisely without losing accuracy.

1. build (or load from the cache) the toy base model: verbose on plain prompts, concise when told;
2. write toy prompt files: train, validation (best-checkpoint selection), test (before/after);
3. evaluate the base model on test prompts, plain and instructed, sampled at temperature 1;
4. run `opsdc train recipes/toy_cpu.yaml` in 2 processes (TP=2);
5. evaluate the best checkpoint the same way; print the table, write summary.json and a plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opsdc_megatron.eval.evaluate import evaluate_hf_folder
from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.prompts import write_prompts
from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.toy.base_model import BuildSettings, ensure_base_model
from opsdc_megatron.toy.task import toy_prompts
from opsdc_megatron.train.metrics import read_metrics

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy_cpu.yaml"
DATA_SEED = 7
TRAIN_PROMPTS, VALIDATION_PROMPTS, TEST_PROMPTS = 4096, 128, 300
TEST_SEED = 424_242


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opsdc-megatron"


def plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    figure, (tokens_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    tokens_axis.plot([m["step"] for m in train], [m["mean_response_tokens"] for m in train], label="rollouts (train prompts)")
    tokens_axis.plot([m["step"] for m in evals], [m["mean_tokens"] for m in evals], "o-", label="validation")
    tokens_axis.set(xlabel="optimizer step", ylabel="mean response tokens", title="Response length")
    accuracy_axis.plot([m["step"] for m in train], [m["rollout_accuracy"] for m in train], label="rollouts (train prompts)")
    accuracy_axis.plot([m["step"] for m in evals], [m["accuracy"] for m in evals], "o-", label="validation")
    accuracy_axis.set(xlabel="optimizer step", ylabel="accuracy (dual-path)", title="Accuracy, sampled at T=1", ylim=(0, 1.05))
    for axis in (tokens_axis, accuracy_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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


def run_demo(
    out: Path, cache: Path | None = None, overrides: list[str] = (), test_prompts: int = TEST_PROMPTS, base_settings: BuildSettings | None = None
) -> dict:
    """`overrides` go to the training recipe (and its eval settings); the smaller sizes serve the smoke test."""
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

    from opsdc_megatron.config import load_config

    overrides = [
        f"out_dir={out / 'train'}", f"model.hf_path={base}",
        f"data.train_prompts={data / 'train.jsonl'}", f"data.eval_prompts={data / 'validation.jsonl'}", *overrides,
    ]
    recipe = load_config(RECIPE, overrides)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=recipe.eval.max_response_tokens)
    evaluation = (recipe.distill.instruction, sampling, TEST_SEED, recipe.rollout.generation_batch_prompts)
    console.rule("3. evaluate the base model")
    before = evaluate_hf_folder(base, test, *evaluation)

    console.rule("4. OPSDC with megatron-core, TP=2, 2 CPU processes")
    subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", str(RECIPE), *overrides], check=True)

    console.rule("5. evaluate the best checkpoint")
    best = out / "train" / "best_hf"
    if not best.exists():
        best = out / "train" / "final_hf"
    after = evaluate_hf_folder(best, test, *evaluation)
    summary = {
        "before": {k: {"accuracy": r.accuracy, "mean_tokens": r.mean_tokens, "n": r.n} for k, r in before.items()},
        "after": {k: {"accuracy": r.accuracy, "mean_tokens": r.mean_tokens, "n": r.n} for k, r in after.items()},
    }
    summary["compression_pct"] = 100 * (1 - summary["after"]["plain"]["mean_tokens"] / summary["before"]["plain"]["mean_tokens"])
    summary["best_checkpoint"] = str(best)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot(read_metrics(out / "train" / "metrics.jsonl"), out / "training_curves.png")
    print_table(summary)
    console.print(f"wrote {out / 'summary.json'} and {out / 'training_curves.png'}")
    return summary
