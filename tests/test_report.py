"""`opsdc report` on a hand-made run folder, and TensorBoard logging of every metric.

The demo's real toy run is rendered in tests/test_demo.py; here the inputs are written by hand so
the table's numbers can be checked exactly.
"""

import time
from pathlib import Path

import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opsdc_megatron.cli import main
from opsdc_megatron.config import ConfigError, LogConfig, load_config, to_yaml
from opsdc_megatron.eval.evaluate import ScoredResponse, summarize
from opsdc_megatron.eval.results import write_result
from opsdc_megatron.models.hf_folder import save_hf_folder
from opsdc_megatron.prompts import PromptRecord
from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.train.metrics import MetricsLog, read_metrics
from tests.launch import run_opsdc

pytestmark = pytest.mark.eval

SAMPLING = SamplingParams(0.6, 0.95, 20, 64)


def fake_result(lengths: list[int], correct: list[bool]):
    records = [PromptRecord(f"q{i}", "1", {"level": 1 + i % 2}) for i in range(len(lengths))]
    responses = [ScoredResponse(i, 0, n, n == 64, ok, ok, False, "Answer: 1" if ok else "") for i, (n, ok) in enumerate(zip(lengths, correct))]
    return summarize(records, responses, 1)


def write_metrics(path: Path, steps: int) -> None:
    log = MetricsLog(path, enabled=True, keep_through_step=0, log=LogConfig(), run_config={})
    log.write({"step": 0, "kind": "eval", "accuracy": 0.5, "mean_tokens": 60.0, "truncated": 0.2, "per_level": {"1": {"accuracy": 0.4}}})
    for step in range(1, steps + 1):
        log.write({"step": step, "kind": "train", "loss": 1.0 / step, "mean_kl": 0.5 / step, "grad_norm": 1.0, "mean_response_tokens": 60.0 - step,
                   "rollout_accuracy": 0.5, "truncated": 0.1, "teacher_refreshed": step == 2})
        if step % 2 == 0:
            log.write({"step": step, "kind": "eval", "accuracy": 0.5 + 0.05 * step, "mean_tokens": 60.0 - 5 * step, "truncated": 0.0, "per_level": {}})
    log.close()


@pytest.fixture
def run_dir(tmp_path):
    run, base = tmp_path / "run", tmp_path / "base_model"
    for folder in (base, run / "best_hf", run / "final_hf", tmp_path / "other"):
        folder.mkdir(parents=True)
    config = load_config(None, [f"out_dir={run}", f"model.hf_path={base}", "data.train_prompts=t.jsonl"])
    (run / "config.yaml").write_text(to_yaml(config))
    write_metrics(run / "metrics.jsonl", steps=4)
    data = tmp_path / "math.jsonl"
    results = {
        base: fake_result([64, 40, 60, 20], [True, False, True, False]),          # 0.5, 46 tokens
        run / "final_hf": fake_result([10, 10, 10, 10], [False] * 4),
        run / "best_hf": fake_result([20, 10, 30, 20], [True, True, True, False]),  # 0.75, 20 tokens
        tmp_path / "other": fake_result([1, 1, 1, 1], [True] * 4),
    }
    for model, result in results.items():
        write_result(run / "eval", "MATH-500", model, data, "math500", "none", None, SAMPLING, 0, "hf", result, prompts_sha256="four", batch_prompts=4)
    write_result(run / "eval", "MATH-500", base, data, "math500", "concise", "be concise", SAMPLING, 0, "hf", fake_result([30] * 4, [True] * 4),
                 prompts_sha256="four", batch_prompts=4)
    return run


def test_report_table_and_plots(run_dir):
    main(["report", str(run_dir)])
    report = (run_dir / "report.md").read_text()
    # plain prompts: before = the start model, after = best_hf (preferred over final_hf), other models left out
    assert "| MATH-500 | 4 x 1 | 0.500 | 0.750 | +25.0 | 46.0 | 20.0 | 56.5% | 0.250 | 0.000 |" in report
    # the instructed evaluation has only a "before"
    assert "| MATH-500 | 4 x 1 | 1.000 | — | — | 30.0 | — | — | 0.000 | — |" in report
    assert "other" not in report and "| 4 | 0.700 | 40.0 | 0.000 |" in report
    for name in ("training_curves.png", "accuracy_vs_length.png", "length_distribution.png"):
        assert f"![{name}]({name})" in report
        image = matplotlib.image.imread(run_dir / name)
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01
    assert not list(run_dir.glob("*.tmp"))


def test_a_moved_run_folder_is_reported_the_same(run_dir, tmp_path):
    """Archived or copied off the cluster: its evaluations name the old folder's exports, and the table lost its
    "after" column. Another run's best_hf evaluated into this run's eval/ still is no "after"."""
    moved = tmp_path / "archive" / "run_v1"
    moved.parent.mkdir()
    run_dir.rename(moved)
    main(["report", str(moved)])
    assert "| MATH-500 | 4 x 1 | 0.500 | 0.750 | +25.0 | 46.0 | 20.0 | 56.5% | 0.250 | 0.000 |" in (moved / "report.md").read_text()

    stranger = tmp_path / "stranger"
    (stranger / "best_hf").mkdir(parents=True)
    for export in ("best_hf", "final_hf"):
        (moved / "eval" / f"math-500.run-{export.replace('_', '-')}.none.json").unlink()
    write_result(moved / "eval", "MATH-500", stranger / "best_hf", tmp_path / "math.jsonl", "math500", "none", None, SAMPLING, 0, "hf",
                 fake_result([1, 1, 1, 1], [True] * 4), prompts_sha256="four", batch_prompts=4)
    main(["report", str(moved)])
    assert "| MATH-500 | 4 x 1 | 0.500 | — | — | 46.0 | — | — |" in (moved / "report.md").read_text()


def test_an_export_rewritten_since_its_evaluation_is_reported_stale(run_dir, tmp_path):
    """best_hf evaluated at step 2, then the run resumed and wrote step 4's best_hf: the report showed the step-2
    numbers as the run's "after"."""
    import torch

    base = tmp_path / "base_model"
    save_hf_folder({"w": torch.zeros(2)}, base, run_dir / "best_hf", trained_steps=2)
    write_result(run_dir / "eval", "MATH-500", run_dir / "best_hf", tmp_path / "math.jsonl", "math500", "none", None, SAMPLING, 0, "hf",
                 fake_result([20, 10, 30, 20], [True, True, True, False]), prompts_sha256="four", batch_prompts=4)
    main(["report", str(run_dir)])
    assert "| MATH-500 | 4 x 1 | 0.500 | 0.750 | +25.0 | 46.0 | 20.0 | 56.5% | 0.250 | 0.000 |" in (run_dir / "report.md").read_text()
    save_hf_folder({"w": torch.ones(2)}, base, run_dir / "best_hf", trained_steps=4)
    moved = tmp_path / "archive" / "run"  # the export is found by what the result file recorded, and checked the same
    moved.parent.mkdir()
    run_dir.rename(moved)
    main(["report", str(moved)])
    stale = "stale: best_hf was evaluated at step 2 and holds step 4 now; rerun opsdc eval"
    assert f"| MATH-500 | 4 x 1 | 0.500 | 0.750 | {stale} | 46.0 | 20.0 | {stale} |" in (moved / "report.md").read_text()


def test_a_run_started_from_another_runs_best_hf_is_reported_before_and_after(tmp_path):
    """Both models are folders named best_hf, evaluated into one --out: the second result file replaced
    the first's name (`math-500.best-hf.none`), and `opsdc eval` refused it."""
    first, second = tmp_path / "run1", tmp_path / "run2"
    for folder in (first / "best_hf", second / "best_hf"):
        folder.mkdir(parents=True)
    config = load_config(None, [f"out_dir={second}", f"model.hf_path={first / 'best_hf'}", "data.train_prompts=t.jsonl"])
    (second / "config.yaml").write_text(to_yaml(config))
    write_metrics(second / "metrics.jsonl", steps=2)
    for model, result in ((first / "best_hf", fake_result([64, 40, 60, 20], [True, False, True, False])),
                          (second / "best_hf", fake_result([20, 10, 30, 20], [True, True, True, False]))):
        write_result(second / "eval", "MATH-500", model, tmp_path / "math.jsonl", "math500", "none", None, SAMPLING, 0, "hf", result,
                     prompts_sha256="four", batch_prompts=4)
    assert len(list((second / "eval").glob("*.json"))) == 2
    main(["report", str(second)])
    assert "| MATH-500 | 4 x 1 | 0.500 | 0.750 | +25.0 | 46.0 | 20.0 | 56.5% | 0.250 | 0.000 |" in (second / "report.md").read_text()


def test_report_without_evaluations_still_plots_training(run_dir):
    for path in (run_dir / "eval").iterdir():
        path.unlink()
    main(["report", str(run_dir)])
    assert "No evaluation results in" in (run_dir / "report.md").read_text()
    assert (run_dir / "training_curves.png").stat().st_size > 10_000 and not (run_dir / "length_distribution.png").exists()


def test_unlike_evaluations_are_not_compared(run_dir, tmp_path):
    """best_hf evaluated on 8 prompts at another temperature: both sizes shown, no change or compression."""
    other_sampling = SamplingParams(1.0, 0.95, 20, 64)
    write_result(run_dir / "eval", "MATH-500", run_dir / "best_hf", tmp_path / "math.jsonl", "math500", "none", None, other_sampling, 0, "hf",
                 fake_result([20] * 8, [True] * 8), prompts_sha256="eight", batch_prompts=4)
    main(["report", str(run_dir)])
    report = (run_dir / "report.md").read_text()
    unlike = "not comparable (prompts, sampling differ)"
    assert f"| MATH-500 | 4 x 1 -> 8 x 1 | 0.500 | 1.000 | {unlike} | 46.0 | 20.0 | {unlike} | 0.250 | 0.000 |" in report


def test_evaluations_of_other_prompts_are_not_compared(run_dir, tmp_path):
    """best_hf evaluated on 4 other prompts (another template, say) at the same settings: as many prompts is not the same ones."""
    write_result(run_dir / "eval", "MATH-500", run_dir / "best_hf", tmp_path / "math.jsonl", "math500", "none", None, SAMPLING, 0, "hf",
                 fake_result([20, 10, 30, 20], [True, True, True, False]), prompts_sha256="four others", batch_prompts=4, prompt_template="{problem} Be brief.")
    main(["report", str(run_dir)])
    assert "| MATH-500 | 4 x 1 | 0.500 | 0.750 | not comparable (prompts differ) |" in (run_dir / "report.md").read_text()


def test_a_missing_responses_file_is_named_before_anything_is_written(run_dir, capsys):
    next((run_dir / "eval").glob("*best-hf.none*.responses.jsonl")).unlink()
    status, _, error = run_opsdc(capsys, "report", str(run_dir))
    assert status == 2 and "its responses file cannot be read (FileNotFoundError" in error
    assert not [p.name for p in run_dir.iterdir() if p.suffix in (".png", ".md")]


def test_report_errors(tmp_path, capsys):
    status, _, error = run_opsdc(capsys, "report", str(tmp_path))
    assert status == 2 and "no config.yaml; expected a training run folder" in error


def _next_second() -> None:
    time.sleep(1.01 - time.time() % 1)


def test_tensorboard_has_every_metric_and_resume_purges(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, steps=4)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mean_kl", "train/grad_norm", "train/mean_response_tokens", "train/rollout_accuracy",
            "train/truncated", "train/teacher_refreshed", "eval/accuracy", "eval/mean_tokens", "eval/per_level/1/accuracy"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, pytest.approx(1.0 / s)) for s in range(1, 5)]
    # resume from step 2: later records leave metrics.jsonl and TensorBoard. Each writer in a second of its own: TensorBoard
    # reads event files in name order, and names of one second and process end in a counter that sorts 10 before 9.
    _next_second()
    log = MetricsLog(path, enabled=True, keep_through_step=2, log=LogConfig(), run_config={})
    log.write({"step": 3, "kind": "train", "loss": 7.0})
    log.close()
    assert [(m["kind"], m["step"]) for m in read_metrics(path)] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 7.0)]
    # resume from step 2 again, its eval deferred by a stop: that eval is redone, once in each log
    _next_second()
    log = MetricsLog(path, enabled=True, keep_through_step=2, log=LogConfig(), run_config={}, redo_eval_step=2)
    log.write({"step": 2, "kind": "eval", "accuracy": 0.9, "mean_tokens": 9.0, "truncated": 0.0, "per_level": {}})
    log.close()
    assert [(m["kind"], m["step"]) for m in read_metrics(path)] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(0, 0.5), (2, pytest.approx(0.9))]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


def test_wandb_configured_but_missing_is_a_config_error():
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"log.wandb_project is set but the wandb package is not installed \(pip install wandb\)"):
            load_config(None, ["out_dir=x", "model.hf_path=m", "data.train_prompts=t", "log.wandb_project=opsdc"])
    else:
        pytest.skip("wandb is installed here")


def test_a_fresh_start_is_a_wandb_run_of_its_own_and_a_resume_continues_it(tmp_path, monkeypatch):
    """A fresh start in a folder whose earlier attempt crashed before its first checkpoint reused that attempt's
    W&B run id, so its steps went into the dead attempt's run (W&B ignoring every step below the old run's last).
    A stand-in for the wandb module records what it is asked: the W&B service cannot be reached from here."""
    import sys
    import types

    started = []
    ids = iter(["first", "second", "third"])
    stand_in = types.SimpleNamespace(
        util=types.SimpleNamespace(generate_id=lambda: next(ids)),
        init=lambda **kwargs: started.append(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None),
    )
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    path, log_config = tmp_path / "metrics.jsonl", LogConfig(tensorboard=False, wandb_project="opsdc")
    for keep_through_step in (-1, 3, -1, 5):  # fresh start, resume, fresh start (the folder's files left by a crash), resume
        MetricsLog(path, enabled=True, keep_through_step=keep_through_step, log=log_config, run_config={}).close()
    assert [(run["id"], run["resume"]) for run in started] == [("first", "allow"), ("first", "allow"), ("second", "allow"), ("second", "allow")]


def test_a_step_line_to_a_terminal_that_hung_up_is_dropped_not_raised(tmp_path):
    """A closed ssh session between a step's stop check and its console line: the write fails with EIO, which ended the
    run without its checkpoint (exit 1). The record is in metrics.jsonl; the line is dropped; other errors still raise."""
    import errno
    import os

    from opsdc_megatron.config import LogConfig
    from opsdc_megatron.train.metrics import MetricsLog, read_metrics

    class Terminal:
        def __init__(self, error: int) -> None:
            self.error = error

        def write(self, text: str) -> int:
            raise OSError(self.error, os.strerror(self.error))

        def flush(self) -> None:
            pass

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, keep_through_step=-1, log=LogConfig(tensorboard=False), run_config={})
    log.console.file = Terminal(errno.EIO)
    log.write({"step": 1, "kind": "train", "loss": 0.5})
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    log.console.file = Terminal(errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        log.write({"step": 2, "kind": "train", "loss": 0.4})
    log.close()
