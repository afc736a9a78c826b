"""`opsdc report RUN_DIR`: the paper's before/after table and plots for one training run.

Reads RUN_DIR/config.yaml, RUN_DIR/metrics.jsonl and the evaluation result files in RUN_DIR/eval/
(written by `opsdc eval --out RUN_DIR/eval` or by `opsdc demo`). "Before" is the model the run
started from (config model.hf_path); "after" is the run's best_hf/ (else final_hf/). Writes, each
atomically:

    report.md                 accuracy / tokens / compression per benchmark, before and after
    training_curves.png       loss, KL, grad norm, response length and accuracy over steps
    accuracy_vs_length.png    validation during training, and benchmarks before -> after
    length_distribution.png   response-length histograms before and after (plain prompts)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from opsdc_megatron.config import read_saved_config
from opsdc_megatron.eval.results import RUN_EXPORTS, ResultFile, read_responses, read_results
from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.models.hf_folder import read_trained_steps
from opsdc_megatron.train.metrics import read_metrics


class RunFolderError(ValueError):
    """RUN_DIR lacks what a report needs; names the missing file."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """PNG written to a temporary file, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, dpi=120, format="png")
    _pyplot().close(figure)
    os.replace(tmp, path)


def plot_training_curves(metrics: list[dict], path: Path) -> None:
    """Per-step training metrics, with validation (kind 'eval') overlaid on length and accuracy."""
    plt = _pyplot()
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    panels = (
        ("loss", "loss (per-token reverse KL)"), ("grad_norm", "grad norm"),
        ("mean_response_tokens", "mean response tokens"), ("rollout_accuracy", "accuracy (dual-path)"), ("truncated", "truncated fraction"),
    )
    figure, axes = plt.subplots(2, 3, figsize=(14, 7))
    for axis, (key, title) in zip(axes.flat, panels):
        rows = [m for m in train if key in m]
        axis.plot([m["step"] for m in rows], [m[key] for m in rows], label="rollouts (train prompts)")
        validation_key = {"mean_response_tokens": "mean_tokens", "rollout_accuracy": "accuracy", "truncated": "truncated"}.get(key)
        if validation_key and evals:
            axis.plot([m["step"] for m in evals], [m[validation_key] for m in evals], "o-", label="validation")
            axis.legend()
        axis.set(xlabel="optimizer step", title=title)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_accuracy_vs_length(metrics: list[dict], pairs: dict[str, tuple[ResultFile | None, ResultFile | None]], path: Path) -> None:
    """Left: validation accuracy against mean length, step by step. Right: each benchmark before -> after."""
    plt = _pyplot()
    evals = [m for m in metrics if m["kind"] == "eval"]
    figure, (trajectory, benchmarks) = plt.subplots(1, 2, figsize=(12, 5))
    if evals:
        points = trajectory.scatter([m["mean_tokens"] for m in evals], [m["accuracy"] for m in evals], c=[m["step"] for m in evals], cmap="viridis")
        trajectory.plot([m["mean_tokens"] for m in evals], [m["accuracy"] for m in evals], color="grey", alpha=0.4)
        figure.colorbar(points, ax=trajectory, label="optimizer step")
    trajectory.set(xlabel="mean response tokens", ylabel="accuracy", title="Validation during training", ylim=(-0.02, 1.02))
    for name, (before, after) in pairs.items():
        present = [r for r in (before, after) if r is not None]
        xs, ys = [r.result["mean_tokens"] for r in present], [r.result["accuracy"] for r in present]
        benchmarks.plot(xs, ys, "o-", label=name)
        if before is not None and after is not None:
            benchmarks.annotate("", xy=(xs[1], ys[1]), xytext=(xs[0], ys[0]), arrowprops={"arrowstyle": "->"})
    if pairs:
        benchmarks.legend()
    benchmarks.set(xlabel="mean response tokens", ylabel="accuracy (mean@k)", title="Benchmarks: before -> after", ylim=(-0.02, 1.02))
    for axis in (trajectory, benchmarks):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def response_lengths(pairs: dict[str, tuple[ResultFile | None, ResultFile | None]]) -> dict[str, dict[str, list[int]]]:
    """benchmark -> {"before"/"after": response tokens of every response} from the results' responses files.

    Raises:
        RunFolderError: a result's responses file is missing or unreadable.
    """
    lengths = {}
    for name, (before, after) in pairs.items():
        lengths[name] = {}
        for label, result in (("before", before), ("after", after)):
            if result is None:
                continue
            try:
                lengths[name][label] = [r["response_tokens"] for r in read_responses(result)]
            except (OSError, ValueError, KeyError) as error:
                raise RunFolderError(f"{result.path}: its responses file cannot be read ({type(error).__name__}: {error})") from None
    return lengths


def plot_length_distribution(lengths_by_benchmark: dict[str, dict[str, list[int]]], path: Path) -> None:
    """Histogram of response tokens per benchmark, before and after, on plain prompts."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(lengths_by_benchmark), figsize=(6 * len(lengths_by_benchmark), 4), squeeze=False)
    for axis, (name, lengths) in zip(axes.flat, lengths_by_benchmark.items()):
        top = max(max(values, default=0) for values in lengths.values())
        bins = list(range(0, top + top // 30 + 2, max(1, top // 30)))
        for label, values in lengths.items():
            axis.hist(values, bins=bins, alpha=0.5, label=f"{label} (mean {sum(values) / max(1, len(values)):.0f})")
        axis.set(xlabel="response tokens", ylabel="responses", title=name)
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def _classify(results: list[ResultFile], run_dir: Path, base_model: Path) -> dict[tuple[str, str], tuple[ResultFile | None, ResultFile | None]]:
    """(benchmark, instruction) -> (before, after); results of other models are left out. The run's exports
    are known by their path, or, in a run folder moved since, by what the result file recorded (`run_export`)."""
    pairs: dict[tuple[str, str], list] = {}

    def export_rank(result: ResultFile) -> int | None:
        export = _run_export(result, run_dir)
        return RUN_EXPORTS.index(export) if export else None

    for result in results:
        key = (result.benchmark, result.instruction)
        pair = pairs.setdefault(key, [None, None])
        rank = export_rank(result)
        if Path(result.model) == base_model:
            pair[0] = result
        elif rank is not None and (pair[1] is None or rank < export_rank(pair[1])):
            pair[1] = result
    return {key: (before, after) for key, (before, after) in pairs.items() if before or after}


def _run_export(result: ResultFile, run_dir: Path) -> str | None:
    """best_hf or final_hf when `result` evaluated that export of the run in `run_dir`."""
    model = Path(result.model)
    export = model.name if model.parent == run_dir else result.run_export
    return export if export in RUN_EXPORTS else None


def _rewritten_since(after: ResultFile, run_dir: Path) -> str | None:
    """The export `after` evaluated, when a resumed run has rewritten it since with other steps' weights."""
    export = _run_export(after, run_dir)
    now = read_trained_steps(run_dir / export) if export and after.trained_steps is not None else None
    if now is None or now == after.trained_steps:
        return None
    return f"stale: {export} was evaluated at step {after.trained_steps} and holds step {now} now; rerun opsdc eval"


def _unlike(before: ResultFile, after: ResultFile) -> list[str]:
    """What makes two evaluations of one benchmark not comparable: other data, prompts (which ones, as
    sent), samples, sampling, instruction or dtype. Older result files recorded neither the prompts'
    digest nor the template nor the dtype; those are compared only when both files have them."""
    settings = {
        "data": lambda r: r.data, "prompts": lambda r: (r.result["n"], r.prompts_sha256 if before.prompts_sha256 and after.prompts_sha256 else None),
        "samples": lambda r: r.result["samples_per_prompt"], "sampling": lambda r: r.sampling, "instruction text": lambda r: r.instruction_text,
        "dtype": lambda r: r.dtype if before.dtype and after.dtype else None,
    }
    return [name for name, get in settings.items() if get(before) != get(after)]


def _cell(result: ResultFile | None, key: str, digits: int) -> str:
    return "—" if result is None else f"{result.result[key]:.{digits}f}"


def markdown(run_dir: Path, config: dict, metrics: list[dict], pairs: dict, plots: list[str]) -> str:
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    distill, steps = config.get("distill", {}), config.get("train", {})
    lines = [
        f"# OPSDC run report: {run_dir.name}", "",
        f"- start model: `{config['model']['hf_path']}`",
        f"- steps run: {train[-1]['step'] if train else 0} of {steps.get('steps')}; prompts per step (global): {steps.get('global_batch_prompts')}; "
        f"lr {steps.get('lr')}; divergence {distill.get('divergence')}; teacher refresh every {distill.get('teacher_refresh_every')} steps",
        "",
        "## Before / after", "",
    ]
    if not pairs:
        lines += [f"No evaluation results in `{run_dir / 'eval'}` for the start model or the run's best_hf/final_hf "
                  f"(write them with `opsdc eval --out {run_dir / 'eval'} ...`).", ""]
    for instruction, heading in (("none", "plain prompts"), ("concise", "concise instruction prepended")):
        rows = {name: pair for (name, kind), pair in pairs.items() if kind == instruction}
        if not rows:
            continue
        lines += [f"### {heading}", "",
                  "| benchmark | prompts x samples | accuracy before | accuracy after | change (points) | tokens before | tokens after | compression | truncated before | truncated after |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, (before, after) in rows.items():
            sizes = list(dict.fromkeys(f"{r.result['n']} x {r.result['samples_per_prompt']}" for r in (before, after) if r))
            size = " -> ".join(sizes)
            change = compression = "—"
            unlike = _unlike(before, after) if before and after else []
            stale = _rewritten_since(after, run_dir) if after else None
            if stale:
                change = compression = stale
            elif unlike:
                change = compression = f"not comparable ({', '.join(unlike)} differ)"
            elif before and after:
                change = f"{100 * (after.result['accuracy'] - before.result['accuracy']):+.1f}"
                if before.result["mean_tokens"] > 0:
                    compression = f"{100 * (1 - after.result['mean_tokens'] / before.result['mean_tokens']):.1f}%"
            lines.append(
                f"| {name} | {size} | {_cell(before, 'accuracy', 3)} | {_cell(after, 'accuracy', 3)} | {change} | "
                f"{_cell(before, 'mean_tokens', 1)} | {_cell(after, 'mean_tokens', 1)} | {compression} | "
                f"{_cell(before, 'truncated', 3)} | {_cell(after, 'truncated', 3)} |"
            )
        lines.append("")
    models = sorted({r.model for pair in pairs.values() for r in pair if r is not None})
    if models:
        lines += ["Models: " + "; ".join(f"`{m}`" for m in models) + ". Accuracy is mean@k with dual-path scoring (Answer line or last box).", ""]
    if evals:
        lines += ["## Validation during training", "", "| step | accuracy | mean tokens | truncated |", "|---|---|---|---|"]
        lines += [f"| {m['step']} | {m['accuracy']:.3f} | {m['mean_tokens']:.1f} | {m['truncated']:.3f} |" for m in evals]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """report.md and the PNGs in RUN_DIR; returns the report's path."""
    run_dir = Path(run_dir).resolve()
    for needed in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / needed).is_file():
            raise RunFolderError(f"{run_dir}: no {needed}; expected a training run folder (the out_dir of `opsdc train`)")
    config = read_saved_config(run_dir / "config.yaml")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    results = read_results(run_dir / "eval") if (run_dir / "eval").is_dir() else []
    pairs = _classify(results, run_dir, Path(config["model"]["hf_path"]).resolve())
    plain = {name: pair for (name, instruction), pair in pairs.items() if instruction == "none"}
    lengths = response_lengths(plain)  # read before any file is written
    plots = ["training_curves.png", "accuracy_vs_length.png"]
    plot_training_curves(metrics, run_dir / plots[0])
    plot_accuracy_vs_length(metrics, plain, run_dir / plots[1])
    if plain:
        plots.append("length_distribution.png")
        plot_length_distribution(lengths, run_dir / plots[2])
    path = run_dir / "report.md"
    write_text_atomic(path, markdown(run_dir, config, metrics, pairs, plots))
    return path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("report", help="before/after table and plots of a training run (report.md + PNGs in RUN_DIR)")
    parser.add_argument("run_dir", help="the out_dir of `opsdc train`")
    parser.set_defaults(handler=report_command)


def report_command(args: argparse.Namespace) -> None:
    try:
        path = write_report(args.run_dir)
    except ValueError as error:
        print(f"opsdc report: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} and its plots")
