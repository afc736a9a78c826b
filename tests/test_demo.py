"""`opsdc demo` end to end at smoke-test size: a 20-step base model, 2 OPSDC steps at TP=2.

The full-size demo (minutes) is run by `make demo`; its measured numbers are in bench/RESULTS.md.
These tests check the pipeline and its outputs, not the compression: the summary, the run report,
and that `opsdc eval` on the demo's test file reproduces the demo's before/after numbers exactly.
"""

import json
from dataclasses import replace

import matplotlib.image
import pytest
import yaml

from opsdc_megatron.cli import main
from opsdc_megatron.demo import TEST_SEED, check_demo_inputs, run_demo
from opsdc_megatron.toy.base_model import BuildSettings
from tests.launch import hangups_not_ignored, run_opsdc

pytestmark = pytest.mark.parallel

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    overrides = ["train.steps=2", "eval.every_steps=1", "eval.max_prompts=8", "rollout.max_response_tokens=32", f"eval.max_response_tokens={MAX_TOKENS}"]
    run_demo(out / "demo", out / "cache", overrides, test_prompts=16, base_settings=replace(BuildSettings(), steps=20))
    return out / "demo"


def test_demo_writes_summary_and_report(demo):
    summary = json.loads((demo / "summary.json").read_text())
    for when in ("before", "after"):
        for kind in ("plain", "instructed"):
            result = summary[when][kind]
            assert set(result) == {"accuracy", "mean_tokens", "n"}
            assert result["n"] == 16 and 0 <= result["accuracy"] <= 1 and 1 <= result["mean_tokens"] <= 32
    assert (demo / "train" / "best_hf" / "model.safetensors").exists()
    report = (demo / "train" / "report.md").read_text()
    before, after = summary["before"]["plain"], summary["after"]["plain"]
    assert f"| toy test | 16 x 1 | {before['accuracy']:.3f} | {after['accuracy']:.3f} |" in report
    for name in ("training_curves.png", "accuracy_vs_length.png", "length_distribution.png"):
        image = matplotlib.image.imread(demo / "train" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


@pytest.mark.eval
def test_opsdc_eval_reproduces_the_demo_numbers(demo, tmp_path):
    """The base model and best_hf, evaluated by `opsdc eval` with the demo's seed and sampling, give the demo's table."""
    summary = json.loads((demo / "summary.json").read_text())
    base = yaml.safe_load((demo / "train" / "config.yaml").read_text())["model"]["hf_path"]
    for when, model in (("before", base), ("after", summary["best_checkpoint"])):
        out = tmp_path / when
        main(["eval", "--model", str(model), "--data", str(demo / "data" / "test.jsonl"), "--samples", "1", "--temperature", "1",
              "--top-p", "1", "--top-k", "0", "--max-tokens", str(MAX_TOKENS), "--instruction", "both", "--instruction-text", "be concise .",
              "--seed", str(TEST_SEED), "--batch-prompts", "16", "--out", str(out)])
        for kind, instruction in (("plain", "none"), ("instructed", "concise")):
            [path] = out.glob(f"*.{instruction}.json")
            result = json.loads(path.read_text())["result"]
            assert {k: result[k] for k in ("accuracy", "mean_tokens", "n")} == summary[when][kind], (when, kind)


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.stpes=3", "Key 'stpes' not in 'TrainConfig'"), ("parallel.tensor_parallel_size=3", "num_attention_heads: expected a multiple of tensor_parallel_size = 3"),
     ("rollout.sglang.python=/nonexistent/python", "rollout.sglang.python: SGLang interpreter /nonexistent/python not found"),
     # the demo's own paths: training went elsewhere, or from another model, and the evaluations read the demo's
     ("out_dir=elsewhere", "out_dir=elsewhere: the demo sets out_dir, model.hf_path, data.train_prompts, data.eval_prompts itself"),
     ("model.hf_path=/nonexistent", "model.hf_path=/nonexistent: the demo sets"),
     ("data={train_prompts: other.jsonl}", "data={train_prompts: other.jsonl}: the demo sets"),  # a section as a mapping
     ("distill={instruction: off}", "distill.instruction: expected text, YAML reads the value as the boolean False")],
)
def test_bad_overrides_are_refused_before_anything_is_built(tmp_path, capsys, override, message):
    """Before the base model (~7 min on a fresh machine) or any file: one line, exit status 2. Also a missing
    SGLang environment for `--rollout sglang` (it failed after the base model and its evaluation)."""
    rollout = ["--rollout", "sglang"] if override.startswith("rollout.sglang") else []
    status, _, error = run_opsdc(capsys, "demo", "--out", str(tmp_path / "demo"), "--cache", str(tmp_path / "cache"), *rollout, override)
    assert status == 2
    assert "opsdc demo: error: " in error and message in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_after_the_base_model_changed_is_refused(demo, tmp_path, capsys):
    """The base model's cache key covers the toy's code: after an update the rerun built a new base model,
    evaluated it as "before", resumed the run trained from the old one and evaluated that as "after"."""
    status, _, error = run_opsdc(capsys, "demo", "--out", str(demo), "--cache", str(tmp_path / "another_cache"), "train.steps=2")
    assert status == 2 and f"{demo / 'train'} holds a run trained from {demo.parent / 'cache'}" in error, error
    assert "remove" in error and not (tmp_path / "another_cache").exists()
    # The same base model in another cache (a relative --cache given from another folder) is no change.
    check_demo_inputs(demo, tmp_path / "another_cache", ["train.steps=2"], base_settings=replace(BuildSettings(), steps=20))


def test_an_out_or_cache_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for flags in (["--out", str(tmp_path / "file")], ["--out", str(tmp_path / "demo"), "--cache", str(tmp_path / "file")]):
        status, _, error = run_opsdc(capsys, "demo", *flags)
        assert status == 2 and f"{tmp_path / 'file'} exists and is not a folder" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_stop_signal_reaches_the_trainer_and_ends_the_demo_after_it(tmp_path):
    """kill, or a closed ssh session, ended the demo and left its `opsdc train` training into the run folder."""
    import os
    import signal
    import sys
    import threading

    from opsdc_megatron.demo import run_training

    hangups_not_ignored()  # tests/conftest.py restores the suite's handler
    stopped = tmp_path / "stopped"
    trainer = [sys.executable, "-c", "import signal, sys, time\n"
               f"def stop(*_):\n    open({str(stopped)!r}, 'w').write('checkpointed')\n    sys.exit(75)\n"
               "signal.signal(signal.SIGTERM, stop)\ntime.sleep(60)\n"]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        stopped.unlink(missing_ok=True)
        sender = threading.Timer(3, os.kill, (os.getpid(), signum))
        sender.start()
        try:
            with pytest.raises(SystemExit) as exit_:
                run_training(trainer)
        finally:
            sender.cancel()
        assert exit_.value.code == 128 + signum and stopped.read_text() == "checkpointed"
