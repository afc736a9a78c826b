"""The whole OPSDC loop through `opsdc train`, on a tiny random Qwen3 with the toy tokenizer.

TP=2, DP=2, PP=2 and PP=2 interleaved (2 gloo processes each) against TP=1; exact resume; the teacher refresh cadence; eval and the best
checkpoint. Each run is a real megatron-core job started by the CLI (torchrun for TP=2).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from opsdc_megatron.models.hf_folder import read_trained_steps
from opsdc_megatron.prompts import write_prompts
from opsdc_megatron.toy.task import TOY_INSTRUCTION, toy_prompts
from opsdc_megatron.train.metrics import read_metrics
from tests.launch import hangups_not_ignored, run_opsdc
from tests.tiny_models import save_toy_qwen3

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = save_toy_qwen3(tmp_path_factory.mktemp("loop"))
    write_prompts(root / "eval.jsonl", toy_prompts(0, 8, "heldout"))
    return root


def train_args(setup, out, *overrides):
    return [
        f"out_dir={out}", f"model.hf_path={setup / 'model'}", f"data.train_prompts={setup / 'train.jsonl'}",
        f"data.eval_prompts={setup / 'eval.jsonl'}", f"distill.instruction={TOY_INSTRUCTION}",
        "rollout.max_response_tokens=24", "rollout.generation_batch_prompts=4", "eval.max_response_tokens=24",
        "eval.every_steps=2", "eval.max_prompts=8", "train.global_batch_prompts=8", "train.micro_batch_prompts=2",
        "train.lr=1e-3", "distill.teacher_refresh_every=2", "checkpoint.save_every_steps=2", *overrides,
    ]


FORK_GUARD = Path(__file__).parent / "fork_guard"


def fork_guarded(out) -> dict:
    """The environment for an `opsdc train` into `out` in which any fork is recorded (tests/fork_guard):
    a fork from the trainer's threads can hang the child, so the trainer must not fork."""
    forks = out.parent / f"{out.name}.forks"
    forks.mkdir(exist_ok=True)
    return dict(os.environ, OPSDC_TEST_FORK_LOG=str(forks), PYTHONPATH=os.pathsep.join(filter(None, [str(FORK_GUARD), os.environ.get("PYTHONPATH")])))


def assert_no_forks(out) -> None:
    folder = out.parent / f"{out.name}.forks"
    assert list(folder.glob("guarded_*")), "the fork guard did not run in the trainer's processes: no fork record would mean nothing"
    forks = sorted(folder.glob("fork_from_*"))
    assert not forks, "the trainer forked:\n" + "\n".join(p.read_text() for p in forks)


def train(setup, out, *overrides, ran_steps: list[int] | None = None):
    """`opsdc train`, fork-guarded; the train records by step. `ran_steps`: the steps this invocation must
    have trained (its console lines), e.g. only the steps after a resumed checkpoint: a fresh rerun would
    reproduce the records of a resume exactly."""
    proc = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *train_args(setup, out, *overrides)],
                          capture_output=True, text=True, timeout=600, env=fork_guarded(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_no_forks(out)
    if ran_steps is not None:
        assert [int(step) for step in re.findall(r"train step\s+(\d+)", proc.stdout)] == ran_steps, proc.stdout[-3000:]
    return {m["step"]: m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"}


@pytest.mark.parametrize("fused_output_layer", [False, True])
@pytest.mark.parametrize("normalization", ["step_tokens", "micro_batch"])
def test_the_student_samples_the_plain_prompt_and_the_loss_is_the_reverse_kl_to_the_instructed_teacher(
    setup, tmp_path, monkeypatch, normalization, fused_output_layer
):
    """The other loop tests compare one layout with another, which all run this code: a teacher and student
    swapped, or rollouts sampled from the teacher's prompt, would pass them. One step at TP=1 in this
    process, recording what the loop sends: rollouts come from the plain prompts, and the step's loss is
    the mean per-token KL(student || teacher) over the response tokens, the teacher reading the toy
    instruction before the prompt, computed here in float64 with transformers on those rollouts. The toy
    model's weights are scaled up first: at its small random weights the two directions of the KL agree to
    1e-5, and a swap passed. With the paper's normalization (micro_batch) and one rollout per micro-batch,
    the loss is the mean over rollouts of each one's mean per-token KL. The fused output layer computes the
    gradients in forward from each token's weight in the objective (its tied output weight's straight into
    megatron DDP's main_grad): the same loss and gradient norm."""
    import shutil

    from opsdc_megatron.cli import main
    from opsdc_megatron.config import load_config
    from opsdc_megatron.prompts import encode_prompt, load_prompts, load_tokenizer
    from opsdc_megatron.train import loop
    from opsdc_megatron.train.prompt_stream import PromptStream

    recorded = {}
    real_generate, real_step = loop.generate_across_ranks, loop.optimizer_step

    def generate(engine, prompt_ids, *args, **kwargs):
        rollouts = real_generate(engine, prompt_ids, *args, **kwargs)
        recorded.update(prompts=prompt_ids, rollouts=rollouts)
        return rollouts

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        recorded.update(loss=result.loss, grad_norm=result.grad_norm)
        return result

    monkeypatch.setattr(loop, "generate_across_ranks", generate)
    monkeypatch.setattr(loop, "optimizer_step", step)
    sharp = tmp_path / "sharp_model"
    shutil.copytree(setup / "model", sharp, ignore=shutil.ignore_patterns("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(4.0)
    model.save_pretrained(sharp)
    args = [*train_args(setup, tmp_path / "one_step", "train.steps=1", "eval.every_steps=0", "parallel.tensor_parallel_size=1",
                        f"distill.loss_normalization={normalization}", "train.micro_batch_prompts=1",
                        f"distill.fused_output_layer={str(fused_output_layer).lower()}"),
            f"model.hf_path={sharp}"]
    main(["train", "recipes/toy_cpu.yaml", *args])  # its stop-signal handlers: tests/conftest.py restores pytest's

    tokenizer = load_tokenizer(sharp)
    config = load_config("recipes/toy_cpu.yaml", args)
    batch = [b.record.prompt for b in PromptStream(load_prompts(setup / "train.jsonl"), tokenizer, config).batch(0)]
    assert recorded["prompts"] == [encode_prompt(tokenizer, prompt) for prompt in batch]
    model = AutoModelForCausalLM.from_pretrained(sharp, dtype=torch.float64).eval()
    model.model.embed_tokens.padding_idx = None  # torch leaves the pad row without gradient; megatron does not (sampled <pad> tokens)
    kl_sums, lengths = [], []
    for prompt, rollout in zip(batch, recorded["rollouts"]):
        response = rollout.response_ids
        log_probs = []
        for context, student_side in ((encode_prompt(tokenizer, prompt), True), (encode_prompt(tokenizer, prompt, TOY_INSTRUCTION), False)):
            with torch.set_grad_enabled(student_side):  # the teacher takes no gradient
                logits = model(torch.tensor([context + response])).logits[0]
            log_probs.append(torch.log_softmax(logits[len(context) - 1 : len(context) - 1 + len(response)], dim=-1))
        student, teacher = log_probs
        kl_sums.append((student.exp() * (student - teacher)).sum())
        lengths.append(len(response))
    token_mean = sum(kl_sums) / sum(lengths)
    rollout_mean = sum(kl / n for kl, n in zip(kl_sums, lengths)) / len(lengths)
    objective = token_mean if normalization == "step_tokens" else rollout_mean
    objective.backward()
    grad_norm = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None) ** 0.5
    assert recorded["loss"] == pytest.approx(objective.item(), rel=1e-5)  # measured 3e-8; the roles swapped differ by 1e-3
    assert recorded["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert abs(token_mean.item() - rollout_mean.item()) > 1e-3 * objective.item(), "the two normalizations agree here"


@pytest.mark.parametrize("stop_during", ["optimizer_step", "weight_push"])
def test_best_hf_follows_the_checkpoints_through_a_stop_at_the_last_step(setup, tmp_path, monkeypatch, stop_during):
    """In this process, TP=1, an eval every step (each scoring better, stood in for), no periodic checkpoints.
    Run 1 stops at its last step, seen right after the optimizer step or only after the weight push (a signal
    that came during it): the checkpoint defers that step's eval (it ran before, and can outlast a time limit's
    signal margin). Run 2 redoes it; no later save comes. Candidates of best_hf never pile up (one full model
    copy each, until a checkpoint), and the redone eval's best reaches best_hf and the checkpoint's state (it
    stayed a best_hf.step_N candidate, the eval pending again at every rerun)."""
    from dataclasses import replace

    from opsdc_megatron.cli import main
    from opsdc_megatron.rollout.hf_engine import HFRolloutEngine
    from opsdc_megatron.train import loop
    from opsdc_megatron.train.preemption import PreemptionWatch

    out = tmp_path / "run"
    real_evaluate, real_step, real_requested = loop.evaluate, loop.optimizer_step, PreemptionWatch.requested
    real_push = HFRolloutEngine.update_weights
    candidates_seen, steps_done, pushed_steps, stop_after = [], [], [], [4]

    def push(engine, weights, version):
        real_push(engine, weights, version)
        pushed_steps.extend([version] if version else [])  # not the launch weights' push

    def evaluate(*args, **kwargs):
        candidates_seen.append(sorted(p.name for p in out.glob("best_hf.step_*")))
        return replace(real_evaluate(*args, **kwargs), accuracy=len(candidates_seen) / 10)  # each eval better

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps_done.append(1)
        return result

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(loop, "optimizer_step", step)
    monkeypatch.setattr(HFRolloutEngine, "update_weights", push)
    done = steps_done if stop_during == "optimizer_step" else pushed_steps
    monkeypatch.setattr(PreemptionWatch, "requested", lambda watch: len(done) == stop_after[0] or real_requested(watch))
    args = ["train", "recipes/toy_cpu.yaml", *train_args(setup, out, "train.steps=4", "eval.every_steps=1", "checkpoint.save_every_steps=0",
                                                          "parallel.tensor_parallel_size=1")]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 75
    assert len(candidates_seen) == 4 and pushed_steps == [1, 2, 3, 4][: len(pushed_steps)]  # the evals of steps 0-3
    stop_after[0] = -1
    main(args)
    assert max(len(seen) for seen in candidates_seen) <= 1, candidates_seen
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["best"]["step"] == 4 and not state["eval_pending"]
    assert (out / "best_hf" / "model.safetensors").exists() and not list(out.glob("best_hf.step_*"))


@pytest.mark.parametrize("failed", ["rollouts", "weight_push", "eval", "rollouts_before_the_stop", "without_a_stop"])
def test_a_stop_that_takes_the_rollout_servers_down_checkpoints_the_last_finished_step(setup, tmp_path, monkeypatch, capsys, failed):
    """A SIGTERM to a SLURM job reaches the rollout servers too. A stop request (the stop file, as the job script and
    `opsdc train` write it) comes during step 3's rollouts, which it interrupts; or step 3's weight push or eval
    fails with it (stood in for: each raises as the SGLang engine does, on every rank alike); or the rollouts fail
    a second before the trainer's own signal comes. The run checkpoints the last finished step (2 for the
    rollouts; 3 for the push and the eval, that eval pending) and exits 75; before, it crashed and lost every step
    since the last periodic checkpoint (none here). The rerun ends with every step and every eval logged once.
    A failure with no stop request is raised."""
    import threading

    from opsdc_megatron.cli import main
    from opsdc_megatron.rollout.engine import RolloutEngineError
    from opsdc_megatron.rollout.hf_engine import HFRolloutEngine
    from opsdc_megatron.train import loop
    from opsdc_megatron.train.preemption import STOP_FILE_ENV

    out, stop_file, armed = tmp_path / "run", tmp_path / "stop_requested", [True]
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    real = {"rollouts": loop.generate_across_ranks, "weight_push": HFRolloutEngine.update_weights, "eval": loop.evaluate}
    phase_failing = failed.split("_before")[0] if failed != "without_a_stop" else "rollouts"

    def fails_at_step_3(phase, step_of):
        def call(*args, **kwargs):
            if step_of(*args, **kwargs) == 3 and armed[0] and phase == phase_failing:
                armed[0] = False
                if failed == "rollouts":  # the real interruption: the engine sees the stop before its first block
                    stop_file.write_text("SIGTERM\n")
                    return real[phase](*args, **kwargs)
                if failed == "rollouts_before_the_stop":
                    threading.Timer(1.0, stop_file.write_text, ["SIGTERM\n"]).start()
                elif failed != "without_a_stop":
                    stop_file.write_text("SIGTERM\n")
                raise RolloutEngineError("rank 0: ServerUnavailable: Connection refused")
            return real[phase](*args, **kwargs)
        return call

    steps_seen, evals = iter(range(1, 100)), iter(range(0, 100))  # evals of steps 0, 1, 2, 3
    monkeypatch.setattr(loop, "generate_across_ranks", fails_at_step_3("rollouts", lambda *a, **k: next(steps_seen)))
    monkeypatch.setattr(HFRolloutEngine, "update_weights", fails_at_step_3("weight_push", lambda engine, weights, version: version))
    monkeypatch.setattr(loop, "evaluate", fails_at_step_3("eval", lambda *a, **k: next(evals)))
    args = ["train", "recipes/toy_cpu.yaml", *train_args(setup, out, "train.steps=4", "eval.every_steps=1", "checkpoint.save_every_steps=0",
                                                          "parallel.tensor_parallel_size=1")]
    if failed == "without_a_stop":
        with pytest.raises(RolloutEngineError, match="Connection refused"):
            main(args)
        assert not list(out.glob("checkpoints/step_*"))
        return
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 75
    what = {"rollouts": "step 3's rollouts", "weight_push": "step 3's weight push", "eval": "step 3's eval"}[phase_failing]
    error = "RolloutInterrupted: rank 0: RolloutInterrupted: a stop was requested" if failed == "rollouts" else "RolloutEngineError: rank 0: ServerUnavailable"
    assert f"opsdc train: {what} failed while a stop was requested, which it is taken for ({error}" in capsys.readouterr().err
    saved = 2 if phase_failing == "rollouts" else 3
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_00000{saved}"]
    state = json.loads((out / "checkpoints" / f"step_00000{saved}" / "trainer_state.json").read_text())
    assert state["step"] == saved and state["eval_pending"] == (phase_failing != "rollouts")
    stop_file.unlink()
    main(args)  # the resumed run: no stop, no failure
    records = read_metrics(out / "metrics.jsonl")
    assert sorted(m["step"] for m in records if m["kind"] == "train") == [1, 2, 3, 4]
    assert sorted(m["step"] for m in records if m["kind"] == "eval") == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tp2_run(setup):
    return train(setup, setup / "tp2", "train.steps=3", "parallel.tensor_parallel_size=2")


@pytest.fixture(scope="module")
def tp1_run(setup):
    return train(setup, setup / "tp1", "train.steps=3", "parallel.tensor_parallel_size=1")


def assert_same_run(reference, other):
    """Same rollouts by their logged statistics (mean length, accuracy, truncation); losses and grad norms within 1e-4 relative, or 2e-5 of the run's largest value: the KL
    is a difference of log-probabilities, so fp32 rounding (other matmul splits and thread counts in
    multi-process runs) scales with the run's losses, not with a late step's small one (4 layers, step 3:
    9e-5, seen 2e-8 apart)."""
    for key in ("loss", "grad_norm"):
        scale = max(abs(reference[step][key]) for step in (1, 2, 3))
        for step in (1, 2, 3):
            rollouts = ("mean_response_tokens", "rollout_accuracy", "truncated")
            assert [reference[step][k] for k in rollouts] == [other[step][k] for k in rollouts], "rollouts differ"
            assert reference[step][key] == pytest.approx(other[step][key], rel=1e-4, abs=2e-5 * scale), (step, key)


def test_tp2_matches_tp1(tp1_run, tp2_run):
    assert_same_run(tp1_run, tp2_run)
    assert tp2_run[1]["loss"] > 0, "same weights, but the teacher's prompt carries the instruction"
    assert tp2_run[3]["loss"] != tp2_run[1]["loss"]


@pytest.mark.main_line  # model level on both lines: tests/test_pipeline.py, tests/test_packing.py
def test_dp2_matches_tp1(setup, tp1_run):
    """Rollouts split over 2 data-parallel ranks; gradients and metrics reduced over both."""
    dp2 = train(setup, setup / "dp2", "train.steps=3", "parallel.tensor_parallel_size=1", "parallel.data_parallel_size=2")
    assert_same_run(tp1_run, dp2)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """The same toy task on a 4-layer model (PP=2 x 2 virtual stages needs 4) and its TP=1 run."""
    root = save_toy_qwen3(tmp_path_factory.mktemp("loop4"), layers=4)
    write_prompts(root / "eval.jsonl", toy_prompts(0, 8, "heldout"))
    return root, train(root, root / "tp1", "train.steps=3", "parallel.tensor_parallel_size=1", "eval.every_steps=0")


def test_pp2_matches_tp1(four_layers):
    """Teacher and student through megatron's 1F1B schedule on 2 pipeline stages; the weights pushed to
    the rollout engine are gathered from both."""
    root, tp1 = four_layers
    pp2 = train(root, root / "pp2", "train.steps=3", "parallel.tensor_parallel_size=1", "parallel.pipeline_parallel_size=2",
                "eval.every_steps=0")
    assert_same_run(tp1, pp2)


@pytest.mark.main_line  # model level on both lines: tests/test_pipeline.py, tests/test_packing.py
def test_interleaved_pp2_with_token_budget_matches_tp1(four_layers):
    """PP=2 x 2 virtual stages with packed micro-batches of a token budget: the step's 8 rollouts fit in
    one micro-batch, split to 4 (twice the stages) of one message shape for the interleaved schedule."""
    root, tp1 = four_layers
    interleaved = train(
        root, root / "pp2_interleaved", "train.steps=3", "parallel.tensor_parallel_size=1", "parallel.pipeline_parallel_size=2",
        "parallel.virtual_pipeline_chunks=2", "model.attention_backend=sdpa", "train.micro_batch_tokens=2096", "eval.every_steps=0",
    )
    assert_same_run(tp1, interleaved)


def test_fused_output_layer_tp2_matches_unfused_tp1(setup, tp1_run):
    """The output layer fused into the reverse KL (tied embeddings, vocabulary split over TP=2)."""
    fused = train(setup, setup / "fused_tp2", "train.steps=3", "parallel.tensor_parallel_size=2", "distill.fused_output_layer=true")
    assert_same_run(tp1_run, fused)


def test_full_activation_recompute_matches(setup, tp1_run):
    """model.activation_recompute=full (megatron's uniform, one-layer recompute) changes no number."""
    recomputed = train(setup, setup / "recompute", "train.steps=3", "parallel.tensor_parallel_size=1", "model.activation_recompute=full")
    assert_same_run(tp1_run, recomputed)


@pytest.mark.main_line  # model level on both lines: tests/test_pipeline.py, tests/test_packing.py
def test_packed_micro_batches_match(setup, tp1_run):
    """train.micro_batch_tokens with the sdpa backend: each rank's rollouts packed into one row per stream
    (thd; tests/test_packing.py compares packed and padded micro-batches directly)."""
    packed = train(setup, setup / "packed", "train.steps=3", "parallel.tensor_parallel_size=1", "model.attention_backend=sdpa",
                   "train.micro_batch_tokens=2096", "eval.every_steps=0")
    assert_same_run(tp1_run, packed)


@pytest.mark.main_line  # model level on both lines: tests/test_pipeline.py, tests/test_packing.py
def test_sequence_parallel_packed_tp2_matches_tp1(setup, tp1_run):
    """parallel.sequence_parallel at TP=2 with packed micro-batches: each stream padded to an even number of
    tokens, half of them on each rank outside the tensor-parallel matmuls (tests/test_pipeline.py and
    tests/test_packing.py compare more layouts at the model level)."""
    sequence_parallel = train(setup, setup / "sequence_parallel", "train.steps=3", "parallel.tensor_parallel_size=2",
                              "parallel.sequence_parallel=true", "model.attention_backend=sdpa", "train.micro_batch_tokens=2096",
                              "eval.every_steps=0")
    assert_same_run(tp1_run, sequence_parallel)


@pytest.mark.main_line  # model level on both lines: tests/test_pipeline.py, tests/test_packing.py
def test_teacher_offload_matches(setup, tp1_run):
    """distill.teacher_offload=true (the teacher streamed from host memory, refreshed at step 2,
    saved in checkpoints from host memory) gives the TP=1 run's numbers exactly. Loading the host
    teacher back: tests/test_teacher_offload.py."""
    offloaded = train(setup, setup / "offload", "train.steps=3", "parallel.tensor_parallel_size=1", "distill.teacher_offload=true",
                      "eval.every_steps=0")
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm", "mean_response_tokens"):
            assert offloaded[step][key] == tp1_run[step][key], (step, key)


def test_a_run_resumed_with_a_larger_batch_goes_on_where_the_stream_stopped(setup, tmp_path, monkeypatch, capsys):
    """Two steps of 4 prompts, then a resume at 8 prompts a step: step 3 takes the stream's prompts 8-15, the
    ones after those used. Batch k was the stream's prompts (k-1) x batch size on: 16-23, skipping 8-15 (most
    of an epoch unused while others came twice)."""
    from opsdc_megatron.cli import main
    from opsdc_megatron.config import load_config
    from opsdc_megatron.prompts import load_prompts, load_tokenizer
    from opsdc_megatron.train import loop
    from opsdc_megatron.train.prompt_stream import PromptStream

    used = []
    real_generate = loop.generate_across_ranks

    def generate(engine, prompt_ids, *args, **kwargs):
        used.append(prompt_ids)
        return real_generate(engine, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(loop, "generate_across_ranks", generate)
    common = ("eval.every_steps=0", "parallel.tensor_parallel_size=1", "rollout.max_response_tokens=4")
    main(["train", "recipes/toy_cpu.yaml", *train_args(setup, tmp_path / "run", "train.steps=2", "train.global_batch_prompts=4", *common)])
    resumed = train_args(setup, tmp_path / "run", "train.steps=3", "train.global_batch_prompts=8", *common)
    main(["train", "recipes/toy_cpu.yaml", *resumed])
    stream = PromptStream(load_prompts(setup / "train.jsonl"), load_tokenizer(setup / "model"), load_config("recipes/toy_cpu.yaml", resumed))
    assert len(used) == 3 and used[2] == [b.student_ids for b in stream.batch(8)]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["prompts_used"] == 16
    assert "another prompt stream" not in capsys.readouterr().err  # the batch size is no other stream


def test_a_resume_with_another_seed_or_prompt_file_says_so(setup, tmp_path, capsys):
    """The stream's order is the seed's and the file's: a resume with others went on in another order, silently.
    In this process (TP=1 runs without torchrun), as the test above."""
    from opsdc_megatron.cli import main

    run, common = tmp_path / "run", ("eval.every_steps=0", "parallel.tensor_parallel_size=1", "rollout.max_response_tokens=4")
    other_prompts = tmp_path / "other.jsonl"
    other_prompts.write_text("".join(reversed((setup / "train.jsonl").read_text().splitlines(keepends=True))))
    for steps, overrides, notice in [
        (1, [], None),
        (2, [], None),
        (3, ["train.seed=5"], "train.seed is 5, was 1234"),
        (4, ["train.seed=5", f"data.train_prompts={other_prompts}"], "the training prompts changed"),
    ]:
        main(["train", "recipes/toy_cpu.yaml", *train_args(setup, run, f"train.steps={steps}", *common), *overrides])
        stderr = capsys.readouterr().err
        stated = re.findall(r"resuming step_\d+ with another prompt stream \((.*)\): prompts are used in a new order from prompt (\d+)", stderr)
        assert stated == ([(notice, str((steps - 1) * 8))] if notice else []), stderr[-3000:]
        assert "settings its run did not have" not in stderr, "the seed and the prompt file are the note above's"


def test_a_resume_under_other_settings_says_so_and_the_best_is_chosen_among_comparable_evals(setup, tmp_path, capsys):
    """A resume with another learning rate or instruction went on silently (config.yaml rewritten, `opsdc report`
    showing the new values for the whole run); one with other eval settings compared its evals with the best of
    the old ones (another token budget, other prompts), so best_hf could stay an eval of another kind."""
    from opsdc_megatron.cli import main

    run, common = tmp_path / "run", ("parallel.tensor_parallel_size=1", "rollout.max_response_tokens=4", "eval.max_prompts=4")
    main(["train", "recipes/toy_cpu.yaml", *train_args(setup, run, "train.steps=2", *common)])
    best = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["best"]
    assert best["step"] == 2 and best["eval"]["sampling"]["max_new_tokens"] == 24
    capsys.readouterr()
    main(["train", "recipes/toy_cpu.yaml", *train_args(setup, run, "train.steps=4", *common), "train.lr=2e-3", "eval.max_response_tokens=6"])
    stderr = capsys.readouterr().err
    assert "resuming step_000002 under settings its run did not have, from step 3 on: train.lr (was 0.001, now 0.002)" in stderr, stderr[-3000:]
    assert "the best eval so far (step 2) asked other prompts or sampled otherwise" in stderr
    best = json.loads((run / "checkpoints" / "step_000004" / "trainer_state.json").read_text())["best"]
    assert best["step"] == 4 and best["eval"]["sampling"]["max_new_tokens"] == 6
    assert read_trained_steps(run / "best_hf") == 4


def test_bf16_distributed_optimizer_follows_tp1_and_resumes_exactly(setup):
    """The clusters' precision: bf16 weights with megatron's mixed-precision optimizer (fp32 main weights
    and Adam state; on CPU through cpu_platform). DP=2 with the distributed optimizer follows the bf16 TP=1
    run within bf16 rounding (other gradient-sum orders), and resumed from its step-2 checkpoint it ends
    with exactly the same weights: the sharded fp32 main weights and Adam state came back (re-deriving
    them from the bf16 weights would round step 3's update differently)."""
    bf16 = ("model.params_dtype=bf16", "parallel.tensor_parallel_size=1", "eval.every_steps=0")
    dp2 = ("parallel.data_parallel_size=2", "parallel.distributed_optimizer=true")
    tp1_run = train(setup, setup / "bf16_tp1", "train.steps=3", *bf16)
    dp2_run = train(setup, setup / "bf16_dp2", "train.steps=3", *bf16, *dp2)
    for step in (1, 2, 3):
        assert dp2_run[step]["mean_response_tokens"] == tp1_run[step]["mean_response_tokens"], "rollouts differ"
        for key in ("loss", "grad_norm"):
            assert dp2_run[step][key] == pytest.approx(tp1_run[step][key], rel=1e-2), (step, key)
    resumed_out = setup / "bf16_dp2_resumed"
    train(setup, resumed_out, "train.steps=2", *bf16, *dp2)
    resumed = train(setup, resumed_out, "train.steps=3", *bf16, *dp2, ran_steps=[3])
    for key in ("loss", "grad_norm", "mean_response_tokens"):
        assert resumed[3][key] == dp2_run[3][key], key
    recorded = yaml.safe_load((resumed_out / "config.yaml").read_text())  # the resumed run's settings, the start model kept
    assert recorded["train"]["steps"] == 3 and recorded["model"]["hf_path"] == os.path.abspath(setup / "model")
    final, resumed_final = (load_file(out / "final_hf" / "model.safetensors") for out in (setup / "bf16_dp2", resumed_out))
    assert final.keys() == resumed_final.keys()
    for name, tensor in final.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, resumed_final[name]), name


def test_teacher_refresh_cadence_and_outputs(setup, tp2_run):
    assert [tp2_run[s]["teacher_refreshed"] for s in (1, 2, 3)] == [False, True, False]
    assert [tp2_run[s]["teacher_age_steps"] for s in (1, 2, 3)] == [1, 0, 1]
    out = setup / "tp2"
    evals = [m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2] and all(e["n"] == 8 for e in evals)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3] and [e.step for e in events.Scalars("eval/accuracy")] == [0, 2]
    assert (out / "best_hf" / "model.safetensors").exists() and (out / "final_hf" / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(out / "final_hf")
    assert (out / "checkpoints" / "latest").read_text() == "step_000003"
    assert json.loads((out / "checkpoints" / "step_000003" / "trainer_state.json").read_text())["step"] == 3


def test_a_run_resumed_with_another_learning_rate_takes_it(setup, tmp_path, tp1_run):
    """`train.lr` lowered on resume: the optimizer's load restored the old rate (megatron-core 0.16) or
    refused the checkpoint outright (0.19, which finds the saved param groups by their lr bounds). Step 3's
    update (Adam and decoupled decay, from the same moments and gradient) is then exactly a tenth of
    the uninterrupted run's."""
    import shutil

    out = tmp_path / "lower_lr"
    train(setup, out, "train.steps=2", "parallel.tensor_parallel_size=1")
    shutil.copytree(out / "final_hf", tmp_path / "step2_hf")
    train(setup, out, "train.steps=3", "parallel.tensor_parallel_size=1", "train.lr=1e-4", ran_steps=[3])
    step2, lowered, uninterrupted = (load_file(folder / "model.safetensors") for folder in (tmp_path / "step2_hf", out / "final_hf", setup / "tp1" / "final_hf"))
    norm = lambda state: sum(float((state[key].double() - step2[key].double()).square().sum()) for key in step2) ** 0.5  # noqa: E731
    assert norm(lowered) == pytest.approx(0.1 * norm(uninterrupted), rel=0.02)


def test_resume_reproduces_the_next_step_exactly(setup, tp2_run):
    out = setup / "resumed"
    first = train(setup, out, "train.steps=2", "parallel.tensor_parallel_size=2")
    assert first[2]["loss"] == tp2_run[2]["loss"]
    resumed = train(setup, out, "train.steps=3", "parallel.tensor_parallel_size=2", ran_steps=[3])
    assert sorted(resumed) == [1, 2, 3]
    for key in ("loss", "grad_norm", "mean_response_tokens", "teacher_age_steps"):
        assert resumed[3][key] == tp2_run[3][key], key
    losses = EventAccumulator(str(out / "tensorboard")).Reload().Scalars("train/loss")  # resume purged nothing it kept, wrote step 3 once
    assert [(e.step, e.value) for e in losses] == [(s, pytest.approx(resumed[s]["loss"])) for s in (1, 2, 3)]


def test_the_teacher_is_written_once_per_refresh_and_a_resume_reads_it_back(setup, tmp_path):
    """Checkpoints every step, a teacher refresh every 2: the teacher, the same for two steps, was written into
    every checkpoint. It now has a folder per refresh, written by the first save after it and named in each
    checkpoint's trainer state; one no kept checkpoint names is removed. Resumed from step 3 (its teacher: step
    2's, from the folder step 2's save wrote), steps 4 and 5 repeat the uninterrupted run exactly."""
    every_step = ("parallel.tensor_parallel_size=1", "eval.every_steps=0", "checkpoint.save_every_steps=1", "checkpoint.keep_last=2")
    full = train(setup, tmp_path / "full", "train.steps=5", *every_step)
    root = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005", "teacher_step_000004_saved_000004"]
    for step in (4, 5):
        assert json.loads((root / f"step_00000{step}" / "trainer_state.json").read_text())["teacher_checkpoint"] == "teacher_step_000004_saved_000004"
    out = tmp_path / "resumed"
    train(setup, out, "train.steps=3", *every_step)
    assert sorted(p.name for p in (out / "checkpoints").glob("teacher_*")) == ["teacher_step_000002_saved_000002"]
    resumed = train(setup, out, "train.steps=5", *every_step, ran_steps=[4, 5])
    for step in (4, 5):
        for key in ("loss", "grad_norm", "mean_response_tokens", "teacher_age_steps"):
            assert resumed[step][key] == full[step][key], (step, key)


@pytest.mark.stops
def test_preempted_run_checkpoints_first_and_evaluates_that_step_on_resume(setup, tmp_path):
    """SIGUSR1 (before a time limit) mid-run, sent as step 1's line appears, so during step 1's eval or
    (on a slow machine) step 2's rollouts. Either the next step's first check stops the run with step 1
    evaluated and checkpointed, or the check right after step 2's optimizer step does: then the trainer
    checkpoints before the weight push and the eval (in a SLURM job the rollout servers got the signal
    too), and the resumed run pushes the checkpoint's weights and first runs the skipped eval. Either
    way it exits 75, every step and every eval is logged exactly once, and the run ends where an
    uninterrupted one does."""
    out = tmp_path / "preempted"
    every_step = ("train.steps=4", "eval.every_steps=1", "parallel.tensor_parallel_size=1", "checkpoint.save_every_steps=0")
    command = [sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *train_args(setup, out, *every_step)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fork_guarded(out))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and any(m["kind"] == "train" for m in read_metrics(metrics))):
        assert proc.poll() is None and time.monotonic() < deadline, "no train step logged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "opsdc train: stopping after step" in stderr, stderr[-3000:]
    assert_no_forks(out)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped = json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())
    assert 1 <= stopped["step"] <= 4, stopped  # at step 4, the last, too: the resumed run pushes, evaluates and exports
    evals = [m["step"] for m in read_metrics(metrics) if m["kind"] == "eval"]
    evaluated_through = stopped["step"] - 1 if stopped["eval_pending"] else stopped["step"]
    assert evals == list(range(evaluated_through + 1)), (evals, stopped)
    train(setup, out, *every_step, ran_steps=list(range(stopped["step"] + 1, 5)))
    records = read_metrics(metrics)
    assert sorted(m["step"] for m in records if m["kind"] == "train") == [1, 2, 3, 4]
    assert sorted(m["step"] for m in records if m["kind"] == "eval") == [0, 1, 2, 3, 4]
    # best_hf: the highest validation accuracy after step 0, fewer tokens breaking ties, then the earlier step
    best_step = -max((m["accuracy"], -m["mean_tokens"], -m["step"]) for m in records if m["kind"] == "eval" and m["step"] > 0)[2]
    final_state = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert final_state["best"]["step"] == best_step, (final_state["best"], records)
    best, final = (load_file(out / name / "model.safetensors") for name in ("best_hf", "final_hf"))
    assert all(torch.equal(best[k], final[k]) for k in final) == (best_step == 4)
    assert (read_trained_steps(out / "best_hf"), read_trained_steps(out / "final_hf")) == (best_step, 4)  # for opsdc report


@pytest.mark.stops
def test_a_stop_before_the_first_step_saves_nothing_and_the_rerun_starts_afresh(setup, tmp_path):
    """SIGUSR1 during start-up (here once the run folder's config is written, before the step-0 eval):
    the watch, made first thing in the process, records it; the run stops before step 1 without a
    checkpoint (step 0 has no optimizer state to save; a step-0 one could not be loaded) and exits 75;
    the same command then runs from the start."""
    out = tmp_path / "early"
    overrides = ("train.steps=1", "eval.every_steps=1", "eval.max_response_tokens=64", "parallel.tensor_parallel_size=1")
    command = [sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *train_args(setup, out, *overrides)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fork_guarded(out))
    deadline = time.monotonic() + 300
    while not (out / "config.yaml").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run folder was not written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    if "opsdc train: stopping before step 1 on SIGUSR1; nothing to checkpoint" in stderr:  # during the step-0 eval, as a rule
        assert not list(out.glob("checkpoints/step_*"))
    else:  # a machine fast enough to finish that eval first stops at step 1, the last one: its push, eval and export are left
        assert "opsdc train: stopping after step 1 on SIGUSR1; checkpoint saved" in stderr, stderr[-3000:]
        assert json.loads((out / "checkpoints" / "step_000001" / "trainer_state.json").read_text())["eval_pending"]
        assert not (out / "final_hf").exists()
    assert train(setup, out, *overrides).keys() == {1}
    assert sorted(m["step"] for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "eval") == [0, 1]
    assert (out / "final_hf" / "model.safetensors").is_file()


@pytest.mark.stops
@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP], ids=["SIGUSR1", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_opsdc_train_reaches_the_processes_it_started(setup, tmp_path, stop_signal):
    """`opsdc train` at TP=2 without a launcher starts its ranks through torchrun, in sessions of their own:
    SIGUSR1 killed this process and left the ranks training unattended; SIGTERM and SIGHUP (a closed terminal)
    made torchrun end them and exit 1. Now they checkpoint after their step, exit 75, and so does `opsdc train`."""
    import psutil

    out = tmp_path / stop_signal.name
    overrides = ("train.steps=20", "eval.every_steps=0", "checkpoint.save_every_steps=0", "parallel.tensor_parallel_size=2")
    command = [sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *train_args(setup, out, *overrides)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fork_guarded(out),
                            preexec_fn=hangups_not_ignored)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and any(m["kind"] == "train" for m in read_metrics(out / "metrics.jsonl"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no train step was logged"
        time.sleep(0.1)
    ranks = psutil.Process(proc.pid).children()
    proc.send_signal(stop_signal)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert "opsdc train: stopping after step" in stderr and f"on {stop_signal.name} to opsdc train; checkpoint saved" in stderr, stderr[-3000:]
    stopped = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert 1 <= stopped["step"] < 20 and len(ranks) == 2 and not [rank for rank in ranks if rank.is_running()]
    assert_no_forks(out)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor_parallel_size=3"], "num_attention_heads"),
        (["parallel.pipeline_parallel_size=3"], "num_hidden_layers: expected a multiple of pipeline_parallel_size"),
        (["data.max_prompt_tokens=10"], "more than data.max_prompt_tokens = 10"),
        (["data.train_prompts=BROKEN"], "broken.jsonl:2: invalid JSON"),
        (["model.hf_path=/nonexistent"], "has no config.json"),
    ],
)
def test_bad_input_fails_before_anything_is_written(setup, tmp_path, capsys, refused_before_start, overrides, message):
    """In this process: `opsdc train` refuses these before torchrun (a subprocess spent ~10 s importing)."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    overrides = [o.replace("BROKEN", str(broken)) for o in overrides]
    status, _, error = run_opsdc(capsys, "train", "recipes/toy_cpu.yaml", f"out_dir={tmp_path / 'run'}", f"model.hf_path={setup / 'model'}",
                                 f"data.train_prompts={setup / 'train.jsonl'}", f"data.eval_prompts={setup / 'eval.jsonl'}", *overrides)
    assert status == 2 and message in error and "Traceback" not in error, error[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_layout_with_more_ranks_than_this_machines_gpus_is_refused(setup, tmp_path, capsys, refused_before_start, monkeypatch):
    """Without a launcher, one GPU per rank on this machine (a GPU machine stood in for: the count is what is checked)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    status, _, error = run_opsdc(capsys, "train", "recipes/toy_cpu.yaml", f"out_dir={tmp_path / 'run'}", f"model.hf_path={setup / 'model'}",
                                 f"data.train_prompts={setup / 'train.jsonl'}", f"data.eval_prompts={setup / 'eval.jsonl'}", "parallel.data_parallel_size=2")
    assert status == 2 and "the layout needs 4 processes, one GPU each (parallel: tensor 2 x pipeline 1 x data 2), and this machine has 2 GPUs" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.stops
def test_every_rank_names_the_stop_request_another_rank_found_first(tmp_path):
    """Rank 0 looked for the stop file just before `opsdc train` wrote it, rank 1 just after: rank 0 stopped
    through the all-reduce and its stop line said "on a signal to another rank" instead of the signal."""
    from tests.launch import torchrun

    output = torchrun("preemption_worker.py", 2, str(tmp_path))
    assert "RANK0_RECEIVED=SIGUSR1 to opsdc train\n" in output, output[-3000:]


@pytest.mark.stops
def test_nohup_keeps_a_hangup_from_stopping_the_commands():
    """`nohup opsdc train|eval|demo &`: SIGHUP starts ignored, and the commands' own handlers took it over; a
    logout stopped a run meant to outlive it. SIGUSR1 ignored (the SLURM job script's start-up) is taken over."""
    from opsdc_megatron.signals import signals_handled
    from opsdc_megatron.train.preemption import PreemptionWatch

    for number in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    watch = PreemptionWatch()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGUSR1) == watch._record
    with signals_handled((signal.SIGTERM, signal.SIGHUP), lambda *_: None):
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) != watch._record
    assert signal.getsignal(signal.SIGTERM) == watch._record


@pytest.mark.stops
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_a_closed_terminal_stops_opsdc_train_after_a_checkpoint(setup, tmp_path, tensor_parallel_size):
    """`opsdc train` in a terminal that hangs up (a closed ssh session): the SIGHUP was recorded, then the step's
    log line to the terminal failed (EIO) and the run died without its checkpoint, exit 1. At TP=2 its ranks,
    out of the signal's reach, write to the same terminal."""
    import pty

    out = tmp_path / "run"
    command = [sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml",
               *train_args(setup, out, "train.steps=20", "eval.every_steps=0", "checkpoint.save_every_steps=0",
                           f"parallel.tensor_parallel_size={tensor_parallel_size}")]
    pid, terminal = pty.fork()  # the child leads a session whose controlling terminal is this pty
    if pid == 0:
        hangups_not_ignored()
        os.execv(sys.executable, command)
    seen, deadline = b"", time.monotonic() + 300
    try:
        while b"train step" not in seen:
            assert time.monotonic() < deadline, seen[-3000:].decode(errors="replace")
            seen += os.read(terminal, 65536)
    finally:
        os.close(terminal)  # the hangup: SIGHUP to the session leader, EIO on every later write
    deadline = time.monotonic() + 300
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
        assert time.monotonic() < deadline, "opsdc train did not stop after the hangup"
        time.sleep(0.2)
    assert os.waitstatus_to_exitcode(waited[1]) == 75, seen[-3000:].decode(errors="replace")
    stopped = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert 1 <= stopped["step"] < 20


@pytest.mark.stops
def test_a_second_stop_signal_inside_the_first_ones_handler_leaves_one_whole_stop_file(tmp_path, monkeypatch):
    """A hangup reaches `opsdc demo` and its `opsdc train`, and the demo passes SIGTERM on: the second handler ran
    inside the first one's write of the stop file and the first one's rename failed out of the signal handler
    (FileNotFoundError in torchrun's agent, which killed the ranks)."""
    from opsdc_megatron.train.preemption import PreemptionWatch

    real_replace, replaced = os.replace, []

    def replace_after_a_second_signal(source, target):
        if not replaced:
            replaced.append(target)
            os.kill(os.getpid(), signal.SIGTERM)  # handled before this call returns
        real_replace(source, target)

    watch = PreemptionWatch()
    watch.forward_to(tmp_path / "stop_requested")
    monkeypatch.setattr(os, "replace", replace_after_a_second_signal)
    os.kill(os.getpid(), signal.SIGUSR1)
    monkeypatch.undo()
    assert replaced and (tmp_path / "stop_requested").read_text() in ("SIGUSR1 to opsdc train\n", "SIGTERM to opsdc train\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stop_requested"]
