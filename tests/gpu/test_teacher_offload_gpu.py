"""The offloaded teacher on a CUDA GPU: pinned host memory, the side copy stream, the memory saving.

A 1.4B-parameter Qwen3-shaped model in bf16 (8 layers of hidden 2048, 32,000-token untied
vocabulary). The streamed teacher's logits equal the resident teacher's bit for bit, its device
memory between forwards is nothing, and its peak during a forward is lower by about one model copy
less two streamed units. CI has no GPU and deselects these (`-m "not gpu"`); run them on a cluster
node with `python -m pytest -m gpu tests/gpu`. The CPU tests of the same mechanism are
tests/test_teacher_offload.py; bench/teacher_offload.py measures time and memory at Qwen3-8B's shape.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config

from opsdc_megatron.distill.teacher import TeacherSnapshot
from opsdc_megatron.models.qwen3.model import build_gpt_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HF_CONFIG = Qwen3Config(
    vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
)


def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), attention_mask=None)


def bytes_of(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_streamed_teacher_on_gpu(one_rank) -> None:
    student = build_gpt_model(HF_CONFIG, 1, params_dtype=torch.bfloat16).eval()
    ids = torch.randint(0, HF_CONFIG.vocab_size, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model_bytes = bytes_of(student)

    forward(student, ids)  # warm-up: cuBLAS workspace and compiled kernels allocated before the baseline
    torch.cuda.synchronize()
    before_teacher = torch.cuda.memory_allocated()
    teacher = TeacherSnapshot(torch.nn.ModuleList([build_gpt_model(HF_CONFIG, 1, params_dtype=torch.bfloat16, empty_on_host=True)]),
                              50, offload=True)
    teacher.copy_from(torch.nn.ModuleList([student]))
    streamed = teacher.model[0]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in streamed.parameters())
    assert torch.cuda.memory_allocated() == before_teacher, "the streamed teacher holds no device memory between forwards"

    # The resident teacher is the student's own weights: its forward peak above them, against the
    # streamed teacher's peak above the same baseline.
    torch.cuda.reset_peak_memory_stats()
    expected = forward(student, ids)
    resident_peak = torch.cuda.max_memory_allocated() - before_teacher + model_bytes
    del expected
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    got = forward(streamed, ids)
    streamed_peak = torch.cuda.max_memory_allocated() - before_teacher
    assert torch.equal(got, forward(student, ids)), "streamed logits differ from the resident teacher's"
    left = torch.cuda.memory_allocated() - before_teacher - got.numel() * got.element_size()
    assert left < 16 * 2**20, f"{left} bytes beyond the logits stay on the device (rotary caches are small)"

    largest_unit = max(bytes_of(unit) for unit in (streamed.embedding, streamed.output_layer, streamed.decoder.layers[0]))
    saving = resident_peak - streamed_peak
    assert saving >= model_bytes - 2 * largest_unit - 64 * 2**20, (
        f"offload saved {saving / 2**30:.2f} GiB of peak memory; the model is {model_bytes / 2**30:.2f} GiB"
    )

    with torch.no_grad():  # a refresh (device-to-host into the pinned copy) reaches the next forward
        for parameter in student.parameters():
            parameter.mul_(0.5)
    teacher.copy_from(torch.nn.ModuleList([student]))
    assert all(p.is_pinned() for p in streamed.parameters())
    assert torch.equal(forward(streamed, ids), forward(student, ids))
