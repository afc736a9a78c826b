"""OPSDC steps at every parallel layout give the TP1 result; checkpoints move between layouts;
the teacher's memory on the last pipeline stage does not grow with the number of micro-batches.

Three launches (tests/workers/pipeline_worker.py): one plain process (TP1 reference, other
micro-batch splits), 2 processes (DP2 with and without megatron's distributed optimizer and gradient reduction
overlapped with backward, TP2 with and without sequence parallelism, PP2 1F1B, PP2 interleaved with 2 virtual
stages, resume, memory) and 4 processes (TP2 x PP2, resume from a 2-process interleaved checkpoint, PP2 x DP2 with
overlapped reduction, TP2 x PP2 interleaved sequence-parallel).
Each layout runs 2 optimizer steps on the same 8 rollouts of varied lengths.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import WORKERS, torchrun

pytestmark = pytest.mark.parallel

TOL = 1e-5
OVERLAP_LAYOUTS = ["dp2_overlap", "dp2_distributed_optimizer_overlap", "dp2_fused_overlap", "pp2_dp2_overlap", "pp2_dp2_fused_overlap",
                   "pp2_interleaved_dp2_overlap"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(WORKERS / "pipeline_worker.py"), str(out), "reference"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    torchrun("pipeline_worker.py", 2, str(out), "two")
    torchrun("pipeline_worker.py", 4, str(out), "four")
    return out


def load(runs, name):
    return torch.load(runs / f"{name}.pt")


def assert_same(reference, other, steps=(1, 2)):
    for step in steps:
        assert other["losses"][step] == pytest.approx(reference["losses"][step], rel=TOL, abs=0), step
    assert reference["weights"].keys() == other["weights"].keys()
    worst = max((other["weights"][k] - reference["weights"][k]).abs().max().item() for k in reference["weights"])
    assert worst <= TOL, f"weights differ by up to {worst:.2e}"


@pytest.mark.parametrize("layout", [
    "tp2", "pp2", "pp2_interleaved", "dp2", "dp2_distributed_optimizer", "tp2_pp2",
    "tp2_sequence_parallel", "tp2_pp2_interleaved_sequence_parallel",  # parallel.sequence_parallel, padded rows
    "tp2_teacher_offload", "pp2_interleaved_teacher_offload",  # distill.teacher_offload: each rank streams its shards and chunks
    *OVERLAP_LAYOUTS,
])
def test_layout_matches_tp1(runs, layout):
    assert_same(load(runs, "tp1"), load(runs, layout))


@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS)
def test_overlapped_gradient_reduction_starts_before_the_step_waits_for_it(runs, layout):
    """parallel.overlap_grad_reduce: by the time finalize_model_grads runs, every rank has started reducing
    every bucket of its chunks (in the last backward, or on later pipeline stages right after it).
    megatron's first step only counts each bucket's gradients, so this is the second step. Only the first
    pipeline stage (with rank 0) splits its gradients into several buckets: megatron buckets no other."""
    started = load(runs, layout)["reductions_started_before_finalize"]
    assert len(started) == (2 if layout.startswith("dp2") else 4)
    assert all(all(buckets) for buckets in started), started
    assert len(started[0]) > 2, started


def test_a_distributed_optimizer_checkpoint_resumed_in_other_buckets_is_refused_by_name(runs):
    """Its state is stored per gradient bucket: megatron's own error named a tensor shape only."""
    refused = torch.load(runs / "overlap_resume_refusal.pt")
    assert refused is not None and "its distributed-optimizer state is stored gradient bucket by gradient bucket" in refused
    assert "overlap_grad_reduce and grad_reduce_bucket_elements it was saved with" in refused and "step_000001" in refused


def test_untied_fused_output_layer_with_overlapped_reduction(runs):
    """The output weight's gradient goes to main_grad in the fused layer's forward; megatron DDP's hook under
    overlap_grad_reduce needs a .grad placeholder for it (and must not add that placeholder)."""
    assert_same(load(runs, "tp1_untied"), load(runs, "dp2_untied_fused_overlap"))


def test_untied_embeddings_through_the_pipeline(runs):
    """lm_head on the last stage, embedding on the first."""
    reference, pp2 = load(runs, "tp1_untied"), load(runs, "pp2_untied")
    assert "lm_head.weight" in pp2["weights"]
    assert_same(reference, pp2)


@pytest.mark.parametrize("layout", ["tp1_micro1", "tp1_micro4", "tp1_packed", "dp2_packed"])
def test_loss_does_not_depend_on_the_micro_batch_split(runs, layout):
    """Micro-batches of 1, 2 and 4 sequences, or packed by a token budget (1 to 3 sequences each,
    sorted by length, balanced by tokens over 2 data-parallel ranks): their response-token counts
    differ, so the paper's per-micro-batch mean would weight tokens differently in each split; the
    per-token mean over the step does not."""
    assert_same(load(runs, "tp1"), load(runs, layout))


@pytest.mark.parametrize("layout", ["dp2_from_pp2", "tp2_pp2_from_pp2_interleaved", "dp2_distributed_optimizer_resumed"])
def test_checkpoint_resumes_at_another_layout(runs, layout):
    """Saved after step 1 at PP2 or PP2 interleaved (2 processes); step 2 at DP2, or at TP2 x PP2 on
    4 processes. The distributed optimizer's checkpoint resumes at the same layout (its state
    sharded over data-parallel ranks)."""
    assert_same(load(runs, "tp1"), load(runs, layout), steps=(2,))


def test_training_moves_the_weights(runs):
    """So that agreeing within TOL above says something: the steps move weights far more than TOL."""

    initial = load_file(runs / "tied" / "model.safetensors")
    trained = load(runs, "tp1")["weights"]
    assert max((trained[k] - initial[k]).abs().max().item() for k in initial) > 100 * TOL


def test_teacher_memory_does_not_grow_with_micro_batches(runs):
    """Peak step memory on each PP2 stage with 8 micro-batches vs 1 (same shape): the teacher's
    logits on the last stage live one micro-batch at a time."""
    stages = torch.load(runs / "teacher_memory.pt")
    for stage in stages:
        one, eight = stage["peak_step_bytes"][1], stage["peak_step_bytes"][8]
        teacher_logits = stage["teacher_logits_bytes_per_micro_batch"]
        print(f"stage {stage['stage']}: peak step memory {one / 2**20:.1f} MiB (1 micro-batch), "
              f"{eight / 2**20:.1f} MiB (8); one micro-batch of teacher logits {teacher_logits / 2**20:.1f} MiB")
        assert eight - one < teacher_logits / 4, stage
    last = stages[-1]
    assert last["peak_step_bytes"][1] > last["teacher_logits_bytes_per_micro_batch"], "the measurement sees the logits"
