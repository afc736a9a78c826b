"""OPSDC optimizer steps at several tensor/pipeline/data-parallel layouts, for tests/test_pipeline.py.

Usage:
  python pipeline_worker.py OUT reference    tiny HF Qwen3 folders, then TP1 PP1 DP1 in this one process,
                                             also with the same tokens split into micro-batches of 1 and
                                             of 4 sequences and packed by a token budget; the untied model
  torchrun --nproc-per-node=2 pipeline_worker.py OUT two     DP2 (distributed optimizer or not, packed, gradient
                                                            reduction overlapped with backward or not, also with
                                                            the fused output layer, tied and untied), TP2 (also
                                                            sequence-parallel),
                                                            PP2 (1F1B), PP2 interleaved, resume, the
                                                            teacher streamed from host memory (TP2, PP2 interleaved)
  torchrun --nproc-per-node=4 pipeline_worker.py OUT four    TP2 x PP2, resume from another layout, PP2 (1F1B
                                                            and interleaved, unfused and fused) x DP2 with
                                                            overlapped reduction,
                                                            TP2 x PP2 interleaved sequence-parallel

Every layout runs the same OPSDC steps (teacher and student forwards through megatron's schedules,
exact reverse KL, AdamW) on the same 8 rollouts and writes, from global rank 0, its per-step losses
and the exported Hugging Face weights to OUT/<layout>.pt; the test compares them. A layout that saves
a checkpoint after step 1 lets a later layout (other sizes, other process count) resume from it.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.config import ParallelConfig, TrainConfig
from opsdc_megatron.distill.batch import ScoredSequence, make_micro_batches, micro_batches_for_rank
from opsdc_megatron.distill.forward import make_forward_step
from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict
from opsdc_megatron.parallel import destroy_distributed, init_distributed
from opsdc_megatron.train.build import build_training_model
from opsdc_megatron.train.checkpoint import load_checkpoint, save_checkpoint
from opsdc_megatron.train.step import optimizer_step

VOCAB = 101  # odd: padded at TP=2
PAD = 0
STEPS = 2
SEQUENCES = 8
INSTRUCTION = [7, 8, 9]
PACKED_MICRO_BATCH_TOKENS = 100  # student + teacher tokens: 1 to 3 of these rollouts per micro-batch
OVERLAP_BUCKET_ELEMENTS = 10_000  # a few of the first chunk's parameters per bucket: several buckets
# A first Adam step moves each weight by lr * g / (|g| + eps); eps = 1e-6 keeps fp32
# reduction-order noise in near-zero gradients below the comparison tolerance.
TRAIN = TrainConfig(lr=1e-3, weight_decay=0.01, adam_eps=1e-6, clip_grad=1.0)

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MEMORY_VOCAB = 32_000
MEMORY_SEQUENCES_PER_MICRO_BATCH = 4


def make_models(out: Path) -> None:
    """4-layer tied and untied Qwen3s (interleaving PP2 x 2 chunks needs 4 layers), and a wide-vocabulary
    one for the memory measurement, where the logits dominate."""
    for name, tied, vocab, layers in (("tied", True, VOCAB, 4), ("untied", False, VOCAB, 4), ("wide", True, MEMORY_VOCAB, 2)):
        torch.manual_seed(1234)
        config = Qwen3Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            tie_word_embeddings=tied,
        )
        model = Qwen3ForCausalLM(config)
        with torch.no_grad():  # norms away from 1, so every tensor's mapping matters
            for parameter_name, parameter in model.named_parameters():
                if parameter_name.endswith("norm.weight"):
                    parameter.uniform_(0.5, 1.5)
        model.save_pretrained(out / name)


def rollouts(count: int, vocab: int, prompt_range: tuple[int, int], response_range: tuple[int, int], seed: int) -> list[ScoredSequence]:
    """Deterministic rollouts of varied prompt and response lengths (so micro-batches differ)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(length_range: tuple[int, int]) -> list[int]:
        length = int(torch.randint(*length_range, (1,), generator=generator))
        return torch.randint(10, vocab, (length,), generator=generator).tolist()

    sequences = []
    for _ in range(count):
        prompt = tokens(prompt_range)
        sequences.append(ScoredSequence(prompt, INSTRUCTION + prompt, tokens(response_range)))
    return sequences


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def run_layout(
    out: Path, name: str, tp: int, pp: int, vp: int = 1, micro_batch_sequences: int = 2,
    save_after_step_1: str | None = None, resume_from: str | None = None, model_name: str = "tied",
    distributed_optimizer: bool = False, micro_batch_tokens: int = 0, teacher_offload: bool = False, overlap_grad_reduce: bool = False,
    sequence_parallel: bool = False, fused_output_layer: bool = False,
) -> None:
    """STEPS optimizer steps at one layout; writes OUT/<name>.pt (losses per step, HF weights; with
    `overlap_grad_reduce`, in small buckets, also which buckets each rank's last step had started reducing
    before finalize_model_grads)."""
    init_distributed(tp, pp, seed=0, virtual_pipeline_chunks=vp)
    try:
        dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        hf_dir = out / model_name
        model = build_training_model(
            Qwen3Config.from_pretrained(hf_dir), str(hf_dir), ParallelConfig(
                tensor_parallel_size=tp, pipeline_parallel_size=pp, virtual_pipeline_chunks=vp,
                data_parallel_size=dp_size, distributed_optimizer=distributed_optimizer, overlap_grad_reduce=overlap_grad_reduce,
                grad_reduce_bucket_elements=OVERLAP_BUCKET_ELEMENTS if overlap_grad_reduce else None, sequence_parallel=sequence_parallel,
            ), torch.float32, TRAIN, 0, teacher_offload=teacher_offload, fused_output_layer=fused_output_layer,
        )
        started_before_finalize = []
        if overlap_grad_reduce:
            config = model.student[0].config
            finalize = config.finalize_model_grads_func

            def finalize_recording_started_reductions(*args, **kwargs):
                started_before_finalize.append([group.grad_reduce_handle is not None for ddp in model.ddps for group in ddp.bucket_groups])
                return finalize(*args, **kwargs)

            config.finalize_model_grads_func = finalize_recording_started_reductions
        micro_batches = micro_batches_for_rank(
            rollouts(SEQUENCES, VOCAB, (3, 12), (1, 14), seed=5), dp_rank, dp_size, micro_batch_sequences,
            micro_batch_tokens, PAD, interleaved_pipeline_size=pp if vp > 1 else 0, token_multiple=tp if sequence_parallel else 1,
        )
        forward_step = make_forward_step("reverse_kl", fused_output_layer)
        losses = {}
        first = 1
        if resume_from is not None:
            state = load_checkpoint(out / resume_from / "step_000001", model.ddps, model.optimizer, model.teacher)
            first = state["step"] + 1
        for step in range(first, STEPS + 1):
            losses[step] = optimizer_step(model.stages, model.optimizer, forward_step, micro_batches).loss
            if step == 1 and save_after_step_1 is not None:
                state = {"step": 1, "teacher_age_steps": model.teacher.age_steps}
                save_checkpoint(out / save_after_step_1, 1, model.ddps, model.optimizer, model.teacher, state, keep_last=1)
        weights = export_hf_state_dict(model.student, keep=dist.get_rank() == 0)  # the other ranks hold no copy
        started = [None] * dist.get_world_size()
        dist.all_gather_object(started, started_before_finalize[-1] if started_before_finalize else None)
        if dist.get_rank() == 0:
            torch.save({"losses": losses, "weights": weights, "reductions_started_before_finalize": started}, out / f"{name}.pt")
        elif weights:
            raise AssertionError(f"rank {dist.get_rank()} kept {len(weights)} exported tensors with keep=False")
        log(f"{name}: losses {losses}")
    finally:
        parallel_state.destroy_model_parallel()


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def current_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def measure_teacher_memory(out: Path) -> None:
    """Peak resident memory of one step above the memory before it, with 1 and with 8 micro-batches
    of the same shape, at PP2 (1F1B), on every stage; wide vocabulary so that the logits dominate.

    Measured as the kernel's resident high-water mark (VmHWM, reset through /proc/self/clear_refs):
    torch has no allocator statistics for CPU tensors. glibc's mmap threshold is fixed at 64 KiB
    first, so every tensor above that is mapped on allocation and unmapped on free, and the resident
    size follows the live tensors rather than the allocator's caching.
    """
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    init_distributed(1, 2, seed=0)
    try:
        hf_dir = out / "wide"
        model = build_training_model(
            Qwen3Config.from_pretrained(hf_dir), str(hf_dir), ParallelConfig(pipeline_parallel_size=2), torch.float32, TRAIN, 0
        )
        forward_step = make_forward_step("reverse_kl")
        sequences = rollouts(MEMORY_SEQUENCES_PER_MICRO_BATCH * 8, MEMORY_VOCAB, (40, 41), (100, 101), seed=7)
        micro_batches = make_micro_batches(sequences, MEMORY_SEQUENCES_PER_MICRO_BATCH, PAD)
        optimizer_step(model.stages, model.optimizer, forward_step, micro_batches)  # optimizer state, buffers
        peaks = {}
        for count in (1, 8):
            dist.barrier()
            before = current_rss_bytes()
            Path("/proc/self/clear_refs").write_text("5")
            optimizer_step(model.stages, model.optimizer, forward_step, micro_batches[:count])
            peaks[count] = peak_rss_bytes() - before
        response_tokens = int(micro_batches[0].response_mask.sum())
        result = {
            "stage": parallel_state.get_pipeline_model_parallel_rank(),
            "peak_step_bytes": peaks,
            "teacher_logits_bytes_per_micro_batch": response_tokens * MEMORY_VOCAB * 4,
        }
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if dist.get_rank() == 0:
            torch.save(gathered, out / "teacher_memory.pt")
        log(f"teacher memory: {gathered}")
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    try:
        if mode == "reference":
            make_models(out)
            run_layout(out, "tp1", 1, 1)
            run_layout(out, "tp1_untied", 1, 1, model_name="untied")
            run_layout(out, "tp1_micro1", 1, 1, micro_batch_sequences=1)
            run_layout(out, "tp1_micro4", 1, 1, micro_batch_sequences=4)
            run_layout(out, "tp1_packed", 1, 1, micro_batch_tokens=PACKED_MICRO_BATCH_TOKENS)
        elif mode == "two":
            run_layout(out, "dp2", 1, 1)
            run_layout(out, "dp2_packed", 1, 1, micro_batch_tokens=PACKED_MICRO_BATCH_TOKENS)
            run_layout(out, "dp2_distributed_optimizer", 1, 1, distributed_optimizer=True, save_after_step_1="ckpt_dp2_distributed")
            run_layout(out, "dp2_distributed_optimizer_resumed", 1, 1, distributed_optimizer=True, resume_from="ckpt_dp2_distributed")
            run_layout(out, "dp2_overlap", 1, 1, overlap_grad_reduce=True)
            run_layout(out, "dp2_distributed_optimizer_overlap", 1, 1, distributed_optimizer=True, overlap_grad_reduce=True)
            try:  # the distributed optimizer's checkpoint, saved in one bucket, into several
                run_layout(out, "dp2_distributed_optimizer_overlap_resumed", 1, 1, distributed_optimizer=True, overlap_grad_reduce=True,
                           resume_from="ckpt_dp2_distributed")
                refused = None
            except ValueError as error:
                refused = str(error)
            if dist.get_rank() == 0:
                torch.save(refused, out / "overlap_resume_refusal.pt")
            # The fused output layer adds the output weight's gradient to main_grad in forward: tied (the embedding's
            # lookup adds one in backward) and untied (none does).
            run_layout(out, "dp2_fused_overlap", 1, 1, fused_output_layer=True, overlap_grad_reduce=True)
            run_layout(out, "dp2_untied_fused_overlap", 1, 1, model_name="untied", fused_output_layer=True, overlap_grad_reduce=True)
            run_layout(out, "tp2", 2, 1)
            run_layout(out, "tp2_sequence_parallel", 2, 1, sequence_parallel=True)
            run_layout(out, "pp2", 1, 2, save_after_step_1="ckpt_pp2")
            run_layout(out, "pp2_interleaved", 1, 2, vp=2, save_after_step_1="ckpt_pp2_interleaved")
            run_layout(out, "dp2_from_pp2", 1, 1, resume_from="ckpt_pp2")
            run_layout(out, "pp2_untied", 1, 2, model_name="untied")
            run_layout(out, "tp2_teacher_offload", 2, 1, teacher_offload=True)
            run_layout(out, "pp2_interleaved_teacher_offload", 1, 2, vp=2, teacher_offload=True)
            measure_teacher_memory(out)
        elif mode == "four":
            run_layout(out, "tp2_pp2", 2, 2)
            run_layout(out, "tp2_pp2_interleaved_sequence_parallel", 2, 2, vp=2, micro_batch_sequences=1, sequence_parallel=True)
            run_layout(out, "pp2_dp2_overlap", 1, 2, overlap_grad_reduce=True)
            run_layout(out, "pp2_dp2_fused_overlap", 1, 2, fused_output_layer=True, overlap_grad_reduce=True)  # the last stage's embedding copy
            run_layout(out, "pp2_interleaved_dp2_overlap", 1, 2, vp=2, micro_batch_sequences=1, overlap_grad_reduce=True)
            run_layout(out, "tp2_pp2_from_pp2_interleaved", 2, 2, resume_from="ckpt_pp2_interleaved")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
