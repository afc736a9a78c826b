"""Packed (thd) micro-batches on a CUDA GPU: Transformer Engine's attention (and SDPAttention's fused
kernels) give the padded micro-batches' response logits and optimizer step.

A small Qwen3-shaped model in bf16 (TE's packed attention kernels take bf16/fp16 only), 8 rollouts
of varied lengths. bf16 rounding differs between the padded and the packed kernels, so the check is
relative: packed vs padded must differ far less than a packed row scored WITHOUT its sequence
boundaries (every sequence then attends to the ones before it). CI has no GPU and deselects these
(`-m "not gpu"`); run them on a cluster node with `python -m pytest -m gpu tests/gpu`. The CPU
tests, exact to 1e-5 in fp32 with the sdpa backend: tests/test_packing.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.config import ParallelConfig, TrainConfig
from opsdc_megatron.distill.batch import ScoredSequence, make_micro_batch, micro_batches_for_rank
from opsdc_megatron.distill.forward import make_forward_step
from opsdc_megatron.models.transformer_engine import guard_broken_transformer_engine
from opsdc_megatron.parallel import destroy_distributed, init_distributed
from opsdc_megatron.train.build import build_training_model
from opsdc_megatron.train.step import optimizer_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HF_CONFIG = Qwen3Config(
    vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
)
BACKENDS = [
    pytest.param("te", marks=pytest.mark.skipif(not guard_broken_transformer_engine().available, reason="needs Transformer Engine")),
    "sdpa",
]
MICRO_BATCH_TOKENS = 2048


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    init_distributed(1, 1, seed=0)
    folder = tmp_path_factory.mktemp("packing_gpu")
    torch.manual_seed(0)
    Qwen3ForCausalLM(HF_CONFIG).save_pretrained(folder)
    yield folder
    destroy_distributed()


def rollouts() -> list[ScoredSequence]:
    generator = torch.Generator().manual_seed(3)
    instruction = torch.randint(1, HF_CONFIG.vocab_size, (24,), generator=generator).tolist()
    sequences = []
    for prompt_tokens, response_tokens in ((40, 300), (17, 5), (64, 180), (9, 1), (33, 420), (50, 77), (12, 250), (28, 31)):
        prompt = torch.randint(1, HF_CONFIG.vocab_size, (prompt_tokens,), generator=generator).tolist()
        response = torch.randint(1, HF_CONFIG.vocab_size, (response_tokens,), generator=generator).tolist()
        sequences.append(ScoredSequence(prompt, instruction + prompt, response))
    return sequences


def build(hf_folder, backend: str):
    return build_training_model(
        HF_CONFIG, str(hf_folder), ParallelConfig(), torch.bfloat16, TrainConfig(lr=1e-4), 0,
        model_options={"attention_backend": backend},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_response_logits_equal_padded(hf_folder, backend) -> None:
    model = build(hf_folder, backend)
    sequences = rollouts()
    errors = {}
    with torch.no_grad():
        padded = make_micro_batch(sequences, pad_id=0).to("cuda")
        packed = make_micro_batch(sequences, pad_id=0, packed=True).to("cuda")
        unbounded = replace(packed, student_packing=None, teacher_packing=None)  # one causal row: reads across sequences
        vocab = slice(0, HF_CONFIG.vocab_size)  # not the -inf vocabulary padding
        reference_student, reference_teacher = (t[..., vocab].float() for t in model.stages[0](padded))
        mask = padded.response_mask.bool()
        for name, batch in (("packed", packed), ("unbounded", unbounded)):
            student, teacher = (t[..., vocab].float() for t in model.stages[0](batch))
            errors[name] = max((student - reference_student)[mask].abs().max().item(),
                               (teacher - reference_teacher)[mask].abs().max().item())
    print(f"{backend}: response logits, packed - padded up to {errors['packed']:.2e}; "
          f"without sequence boundaries {errors['unbounded']:.2e}")
    assert errors["packed"] < errors["unbounded"] / 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_optimizer_step_equals_padded(hf_folder, backend) -> None:
    """Per-token loss and grad norm of two steps (the second on the weights the first step left). Weights
    are not compared element by element: Adam's first update is about lr x sign(gradient), which bf16
    noise flips where a gradient is near zero."""
    results = {}
    for packed in (False, True):
        model = build(hf_folder, backend)
        micro_batches = micro_batches_for_rank(rollouts(), 0, 1, 1, MICRO_BATCH_TOKENS, 0, packed=packed)
        assert all((b.student_packing is not None) == packed for b in micro_batches)
        steps = [optimizer_step(model.stages, model.optimizer, make_forward_step("reverse_kl"), micro_batches) for _ in range(2)]
        results[packed] = ([s.loss for s in steps], [s.grad_norm for s in steps])
    (padded_losses, padded_norms), (packed_losses, packed_norms) = results[False], results[True]
    print(f"{backend}: losses padded {padded_losses}, packed {packed_losses}; grad norms {padded_norms}, {packed_norms}")
    assert padded_losses[1] != padded_losses[0], "the first step moved the weights"
    assert packed_losses == pytest.approx(padded_losses, rel=2e-2)
    assert packed_norms == pytest.approx(padded_norms, rel=2e-2)
