"""The weight export on a CUDA GPU: each gathered parameter goes to host memory at once, so the
device never holds a second copy of the model (a bf16 Qwen3-32B at TP=8 would not fit an 80 GB GPU
beside its shards). CI has no GPU and deselects these (`-m "not gpu"`); run them on a cluster node
with `python -m pytest -m gpu tests/gpu`. The export's values are checked on CPU by the conversion
and training tests."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config

from opsdc_megatron.models.qwen3.model import build_gpt_model
from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_export_holds_at_most_one_parameter_on_the_device(one_rank) -> None:
    config = Qwen3Config(vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)
    model = build_gpt_model(config, 1, params_dtype=torch.bfloat16)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    state = export_hf_state_dict(model)
    torch.cuda.synchronize()
    assert all(t.device.type == "cpu" for t in state.values())
    assert sum(t.numel() * t.element_size() for t in state.values()) == model_bytes
    assert torch.cuda.memory_allocated() == before, "nothing of the export stays on the device"
    assert torch.cuda.max_memory_allocated() - before <= 2 * largest, "at most a gathered parameter (and its shard) at a time"
