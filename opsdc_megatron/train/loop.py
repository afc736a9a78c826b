"""The OPSDC loop (On-Policy Self-Distillation for reasoning Compression, arXiv 2603.05433).

    prompts -> rollouts -> teacher/student scoring -> reverse KL -> optimizer step -> weight push -> checkpoint

The student samples one response per prompt from its current weights; the teacher is a snapshot of
the student refreshed every M steps, conditioned on a conciseness instruction; the loss is the exact
full-vocabulary reverse KL on the student's tokens. No rewards and no reference answers are used for
training (answers only score the logged accuracy).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoConfig

from opsdc_megatron.config import ConfigError, RunConfig, read_saved_config, stream_token_multiple, to_yaml
from opsdc_megatron.distill.batch import ScoredSequence, micro_batches_for_rank
from opsdc_megatron.distill.forward import make_forward_step
from opsdc_megatron.eval.evaluate import evaluate
from opsdc_megatron.eval.results import prompts_digest
from opsdc_megatron.eval.scoring import score
from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.models.hf_folder import save_hf_folder
from opsdc_megatron.models.layer_spec import supports_packed_sequences
from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict
from opsdc_megatron.parallel import destroy_distributed, init_distributed
from opsdc_megatron.prompts import load_prompts, load_tokenizer, prompt_opens_reasoning, stop_token_ids
from opsdc_megatron.rollout.engine import RolloutEngine, RolloutEngineError, SamplingParams, generate_across_ranks
from opsdc_megatron.rollout.hf_engine import HFRolloutEngine
from opsdc_megatron.train.checkpoint import best_candidate, load_checkpoint, record_trainer_state, save_checkpoint, settle_best_export
from opsdc_megatron.train.metrics import MetricsLog
from opsdc_megatron.train.preemption import PreemptionWatch
from opsdc_megatron.train.prompt_stream import PromptStream
from opsdc_megatron.train.run_folder import FINAL_EXPORT, resume_point, trajectory_changes
from opsdc_megatron.train.build import build_training_model
from opsdc_megatron.train.step import apply_optimizer_settings, optimizer_step

EVAL_SEED = 20_260_303
STOP_GRACE_S = 5.0
"""How long a failure of the rollouts, a push or an eval waits for the stop request that may explain it."""


def run(config: RunConfig, preemption: PreemptionWatch) -> None:
    """Entry point on every rank (torchrun or a single process); `preemption` watches for stop signals."""
    p = config.parallel
    init_distributed(p.tensor_parallel_size, p.pipeline_parallel_size, seed=config.train.seed, virtual_pipeline_chunks=p.virtual_pipeline_chunks)
    engine = None
    try:
        if dist.get_world_size() != config.world_size:  # a launcher of the user's (torchrun, srun) chose the process count
            raise ConfigError(
                f"{dist.get_world_size()} processes, but the recipe's layout needs {config.world_size} = "
                f"parallel.tensor_parallel_size x pipeline_parallel_size x data_parallel_size ({p.tensor_parallel_size} x "
                f"{p.pipeline_parallel_size} x {p.data_parallel_size}): set parallel.data_parallel_size, or start {config.world_size}"
            )
        engine = build_rollout_engine(config)
        train(config, engine, preemption)
    finally:
        if engine is not None:
            engine.close()
        destroy_distributed()


def build_rollout_engine(config: RunConfig) -> RolloutEngine:
    """rollout.engine: hf (in-process) or sglang (servers started by rank 0, stopped by close())."""
    tokenizer = load_tokenizer(config.model.hf_path)
    hf_config = AutoConfig.from_pretrained(config.model.hf_path)
    if config.rollout.engine == "sglang":
        from opsdc_megatron.rollout.sglang.start import start_sglang_engine

        return start_sglang_engine(config, stop_token_ids(config.model.hf_path, tokenizer), hf_config.vocab_size)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.model.params_dtype]
    return HFRolloutEngine(hf_config, stop_token_ids(config.model.hf_path, tokenizer), tokenizer.pad_token_id, dtype)


def train(config: RunConfig, engine: RolloutEngine, preemption: PreemptionWatch) -> None:
    out = Path(config.out_dir)
    rank0 = dist.get_rank() == 0
    engine.stop_requested = preemption.seen_here  # rollouts end at once on a stop
    tokenizer = load_tokenizer(config.model.hf_path)
    prompts = PromptStream(load_prompts(config.data.train_prompts), tokenizer, config)
    reasoning_open = prompt_opens_reasoning(tokenizer)  # for the rollouts' accuracy
    eval_records = load_prompts(config.data.eval_prompts)[: config.eval.max_prompts] if config.eval.every_steps else []

    hf_config = AutoConfig.from_pretrained(config.model.hf_path)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.model.params_dtype]
    model_options = dict(
        attention_backend=config.model.attention_backend, fp8=config.model.fp8, activation_recompute=config.model.activation_recompute
    )
    model = build_training_model(
        hf_config, config.model.hf_path, config.parallel, dtype, config.train, config.distill.teacher_refresh_every,
        model_options=model_options, megatron_checkpoint=config.model.megatron_checkpoint,
        fused_output_layer=config.distill.fused_output_layer, teacher_offload=config.distill.teacher_offload,
    )
    student, teacher = torch.nn.ModuleList(model.student), model.teacher
    forward_step = make_forward_step(config.distill.divergence, config.distill.fused_output_layer, config.distill.loss_normalization)
    block = config.rollout.generation_batch_prompts
    packed = supports_packed_sequences(config.model.attention_backend)  # with train.micro_batch_tokens
    interleaved_pipeline_size = config.parallel.pipeline_parallel_size if len(model.stages) > 1 else 0
    token_multiple = stream_token_multiple(config)

    checkpoints = out / "checkpoints"
    resume_from = resume_point(out, config.checkpoint.resume, config.train.steps)
    state = {"step": 0, "teacher_age_steps": 0, "best": None, "eval_pending": False, "prompts_used": 0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model.ddps, model.optimizer, teacher)
        state.setdefault("prompts_used", state["step"] * config.train.global_batch_prompts)  # a checkpoint from before the count
        if rank0 and (changes := prompts.changes_since(state.get("prompt_stream"))):
            print(f"opsdc train: resuming {resume_from.name} with another prompt stream ({'; '.join(changes)}): prompts are used "
                  f"in a new order from prompt {state['prompts_used']} of the stream on", file=sys.stderr, flush=True)
        apply_optimizer_settings(model.optimizer, config.train)
    eval_sampling = SamplingParams(config.eval.temperature, config.eval.top_p, config.eval.top_k, config.eval.max_response_tokens)
    # The best eval is the best among evals of one kind: a resume that evaluates otherwise starts the choice over.
    eval_kind = {"prompts_sha256": prompts_digest(eval_records), "sampling": asdict(eval_sampling), "block_prompts": block}
    if state["best"] is not None and state["best"].get("eval", eval_kind) != eval_kind:
        if rank0:
            print(f"opsdc train: the best eval so far (step {state['best']['step']}) asked other prompts or sampled otherwise than this "
                  f"run's evals: the best is chosen again among this run's, and best_hf replaced by the first", file=sys.stderr, flush=True)
        state["best"] = None
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        settle_best_export(out, state["best"])  # a candidate the checkpoint recorded, or none
        # The run's record, rewritten on resume (steps, layout may change): `opsdc report` and `opsdc
        # convert` read the start model from it, from any directory; it stays the first start's.
        start_model = os.path.abspath(config.model.hf_path)
        if resume_from is not None and (out / "config.yaml").is_file():
            saved = read_saved_config(out / "config.yaml")
            if changes := trajectory_changes(saved, asdict(replace(config, model=replace(config.model, hf_path=start_model)))):
                print(f"opsdc train: resuming {resume_from.name} under settings its run did not have, from step {state['step'] + 1} on: "
                      f"{'; '.join(changes)}", file=sys.stderr, flush=True)
            start_model = saved["model"]["hf_path"]
        write_text_atomic(out / "config.yaml", to_yaml(replace(config, model=replace(config.model, hf_path=start_model))))
    state["prompt_stream"] = prompts.identity
    keep_through_step = state["step"] if resume_from is not None else -1  # a fresh start keeps no earlier line
    # The eval a preempted run's stop deferred (done below); a record of it from a resumed attempt that crashed is dropped.
    redo_eval_step = state["step"] if config.eval.every_steps and state.get("eval_pending") else None
    log = MetricsLog(out / "metrics.jsonl", enabled=rank0, keep_through_step=keep_through_step, log=config.log, run_config=asdict(config),
                     redo_eval_step=redo_eval_step)
    # The weights the engine serves, and rank 0's best/final export; ranks that use neither keep none.
    keeps_weights = rank0 or engine.reads_pushed_weights
    pushed = export_hf_state_dict(model.student, keeps_weights)

    rollout_sampling = SamplingParams(config.rollout.temperature, config.rollout.top_p, config.rollout.top_k, config.rollout.max_response_tokens)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def run_eval(step: int) -> None:
        result = evaluate(engine, tokenizer, eval_records, eval_sampling, EVAL_SEED, block)
        log.write({"step": step, "kind": "eval", **result.as_dict()})
        best = state["best"]
        if step > 0 and (best is None or (result.accuracy, -result.mean_tokens) > (best["accuracy"], -best["mean_tokens"])):
            state["best"] = {"step": step, "accuracy": result.accuracy, "mean_tokens": result.mean_tokens, "eval": eval_kind}
            if rank0:  # best_hf once a checkpoint records this eval: a resume from an earlier one may score otherwise
                settle_best_export(out, None)  # earlier candidates: no checkpoint recorded them (each save settles), and this one is better
                save_hf_folder(pushed, config.model.hf_path, best_candidate(out, step), trained_steps=step)

    saved_step = state["step"] if resume_from is not None else None

    def save(step: int) -> None:
        nonlocal saved_step
        save_checkpoint(checkpoints, step, model.ddps, model.optimizer, teacher, state, config.checkpoint.keep_last)  # 7. checkpoint
        if rank0:
            settle_best_export(out, state["best"])
        saved_step = step

    def stop() -> NoReturn:
        """Checkpoint the current step unless it is saved (step 0 has nothing to save), then exit 75."""
        if saved_step != state["step"] and state["step"] > 0:
            save(state["step"])
        preemption.exit_after_checkpoint(state["step"])

    def stop_if_requested() -> None:
        """A stop signal that came during start-up, or after the last step's check (during its push, eval or save)."""
        if preemption.requested():
            stop()

    def raise_unless_stopping(error: RolloutEngineError, what: str) -> None:
        """Rollouts, a push or an eval that failed: a stop request's doing when one comes (a SIGTERM to the job
        takes the rollout servers down too; a stop interrupts rollouts), else `error` is raised. The servers'
        SIGTERM can come seconds before the trainer's own (slurmd signals each node, each step, in turn): the
        ranks wait STOP_GRACE_S for it. Collective: a RolloutEngineError is raised on every rank alike."""
        for _ in range(int(STOP_GRACE_S / 0.5)):  # rounds, not a deadline: every rank leaves at the same one
            if preemption.requested():  # one all-reduce a round keeps the ranks together
                break
            time.sleep(0.5)
        else:
            raise error
        if rank0:
            print(f"opsdc train: {what} failed while a stop was requested, which it is taken for ({type(error).__name__}: {error})",
                  file=sys.stderr, flush=True)

    try:
        engine.update_weights(pushed, version=state["step"])
        stop_if_requested()  # before the start's eval, which can outlast a time limit's signal margin (a deferred one stays deferred)
        if (config.eval.every_steps and state["step"] == 0) or redo_eval_step is not None:
            run_eval(state["step"])  # the start, or the eval a preempted run skipped at its last step
    except RolloutEngineError as error:
        raise_unless_stopping(error, "the start's weight push or eval")
        stop()
    if redo_eval_step is not None:  # recorded in the checkpoint of its step: no later save may come (a stop at the last step)
        state["eval_pending"] = False
        if rank0:
            record_trainer_state(resume_from, state)
            settle_best_export(out, state["best"])
    for step in range(state["step"] + 1, config.train.steps + 1):
        stop_if_requested()
        started = time.perf_counter()
        batch = prompts.batch(state["prompts_used"])  # 1. prompts
        try:
            rollouts = generate_across_ranks(engine, [b.student_ids for b in batch], rollout_sampling, prompts.rollout_seed(step), block)  # 2. rollouts
        except RolloutEngineError as error:
            raise_unless_stopping(error, f"step {step}'s rollouts")
            stop()  # the resumed run redoes the step
        rollout_s = time.perf_counter() - started
        stale = {r.weight_version for r in rollouts} - {step - 1}
        if stale:
            raise RuntimeError(f"step {step}: rollouts sampled with weight versions {sorted(stale)}, expected {step - 1}")
        sequences = [ScoredSequence(b.student_ids, b.teacher_ids, r.response_ids) for b, r in zip(batch, rollouts)]
        micro_batches = micro_batches_for_rank(
            sequences, dp_rank, dp_size, config.train.micro_batch_prompts, config.train.micro_batch_tokens,
            tokenizer.pad_token_id, packed, interleaved_pipeline_size, token_multiple,
        )
        result = optimizer_step(model.stages, model.optimizer, forward_step, micro_batches)  # 3-5. scoring, KL, step
        refreshed = teacher.after_optimizer_step(student)
        # SIGUSR1/SIGTERM: checkpoint now, then exit. The push and the eval are left to the resumed run:
        # they need the rollout servers, and in a preempted job the servers got the signal too.
        stopping = preemption.requested()  # at the last step too: the resumed run does its push, eval and final export
        eval_due = bool(config.eval.every_steps) and step % config.eval.every_steps == 0
        if not stopping:
            engine.release_weights()
            pushed.clear()  # the last step's host copy goes first: one copy of the model in host memory, not two
            pushed = export_hf_state_dict(model.student, keeps_weights)
            try:
                engine.update_weights(pushed, version=step)  # 6. weight push
            except RolloutEngineError as error:
                raise_unless_stopping(error, f"step {step}'s weight push")
                stopping = True
        state.update(step=step, teacher_age_steps=teacher.age_steps, eval_pending=stopping and eval_due, prompts_used=state["prompts_used"] + len(batch))
        elapsed = time.perf_counter() - started
        lengths = [len(r.response_ids) for r in rollouts]
        texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
        log.write({
            "step": step, "kind": "train", "loss": result.loss, "grad_norm": result.grad_norm,
            "mean_response_tokens": sum(lengths) / len(lengths),
            "rollout_accuracy": sum(score(t, b.record.answer, reasoning_open) for t, b in zip(texts, batch)) / len(batch),
            "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "response_tokens_per_s": sum(lengths) / elapsed, "rollout_s": rollout_s, "step_s": elapsed,
            "teacher_refreshed": refreshed, "teacher_age_steps": teacher.age_steps,
        })
        if eval_due and not stopping and preemption.requested():  # a stop during the push: no eval, as above
            stopping = state["eval_pending"] = True
        if eval_due and not stopping:
            try:
                run_eval(step)
            except RolloutEngineError as error:
                raise_unless_stopping(error, f"step {step}'s eval")
                stopping = state["eval_pending"] = True
        if stopping:
            stop()
        if step == config.train.steps or (config.checkpoint.save_every_steps and step % config.checkpoint.save_every_steps == 0):
            save(step)
    if rank0:
        save_hf_folder(pushed, config.model.hf_path, out / FINAL_EXPORT, trained_steps=state["step"])
    log.close()
