"""`opsdc train` end to end on one CUDA GPU: NCCL (one rank), bf16, the sdpa layers, the Triton KL,
rollouts from the in-process engine on the GPU, packed micro-batches and the fused output layer.

Every CPU test runs the same loop on gloo; this is the run that shows the CUDA paths fit together.
Fused and unfused runs sample the same rollouts (same seeds, same weights at step 1) and must agree
on the step-1 loss within bf16 rounding; every step's loss and grad norm are finite, and the final
Hugging Face export loads. CI has no GPU and deselects these (`-m "not gpu"`); run them on a cluster
node with `python -m pytest -m gpu tests/gpu`. With two GPUs also: sequence parallelism at TP=2 (Transformer
Engine's norms and layers, and the sdpa ones) follows the same run without it."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from opsdc_megatron.models.transformer_engine import guard_broken_transformer_engine
from opsdc_megatron.toy.task import TOY_INSTRUCTION
from opsdc_megatron.train.metrics import read_metrics
from tests.tiny_models import save_toy_qwen3

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def train(root, out, *overrides):
    args = [
        f"out_dir={out}", f"model.hf_path={root / 'model'}", f"data.train_prompts={root / 'train.jsonl'}",
        f"distill.instruction={TOY_INSTRUCTION}", "model.params_dtype=bf16", "model.attention_backend=sdpa",
        "rollout.max_response_tokens=48", "train.global_batch_prompts=8", "train.micro_batch_prompts=4", "train.steps=3",
        "train.lr=1e-3", "eval.every_steps=0", "distill.teacher_refresh_every=2", "parallel.tensor_parallel_size=1", *overrides,
    ]
    proc = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {m["step"]: m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"}


def test_opsdc_train_on_one_gpu_unfused_and_fused_packed(tmp_path_factory) -> None:
    """The default path, and the fused output layer with packed micro-batches, which must agree with it at step 1."""
    root = save_toy_qwen3(tmp_path_factory.mktemp("train_gpu"), layers=2)
    unfused = train(root, root / "unfused")
    fused = train(root, root / "fused_packed", "distill.fused_output_layer=true", "train.micro_batch_tokens=512")
    for name, run in (("unfused", unfused), ("fused_packed", fused)):
        assert sorted(run) == [1, 2, 3]
        for metrics in run.values():
            assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["loss"] >= 0
        AutoModelForCausalLM.from_pretrained(root / name / "final_hf")
    assert fused[1]["mean_response_tokens"] == unfused[1]["mean_response_tokens"], "same rollouts at step 1"
    assert fused[1]["loss"] == pytest.approx(unfused[1]["loss"], rel=2e-2, abs=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (tensor parallelism)")
@pytest.mark.parametrize("attention_backend", [
    pytest.param("te", marks=pytest.mark.skipif(not guard_broken_transformer_engine().available, reason="needs Transformer Engine")),
    "sdpa",
])
def test_sequence_parallel_follows_tp2_on_two_gpus(tmp_path_factory, attention_backend) -> None:
    """parallel.sequence_parallel at TP=2 (packed micro-batches): the CPU tests check it exactly in fp32 with
    megatron's local layers; here NCCL's all-gather/reduce-scatter and, with te, Transformer Engine's norms."""
    root = save_toy_qwen3(tmp_path_factory.mktemp("sequence_parallel_gpu"), layers=2)
    tp2 = ("parallel.tensor_parallel_size=2", f"model.attention_backend={attention_backend}", "train.micro_batch_tokens=512")
    plain = train(root, root / "tp2", *tp2)
    split = train(root, root / "tp2_sequence_parallel", *tp2, "parallel.sequence_parallel=true")
    assert sorted(split) == [1, 2, 3]
    for metrics in split.values():
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert split[1]["mean_response_tokens"] == plain[1]["mean_response_tokens"], "same rollouts at step 1"
    for key in ("loss", "grad_norm"):
        assert split[1][key] == pytest.approx(plain[1][key], rel=2e-2, abs=1e-4), key
