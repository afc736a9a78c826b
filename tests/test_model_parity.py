"""Qwen3 on megatron-core: parity with transformers, state-dict round trips, and input checks.

The multi-process checks (logits, export, optimizer step at TP=1 vs TP=2, dist_checkpointing)
share one 2-process launch: see tests/workers/model_parity_worker.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from transformers import Qwen3Config

from opsdc_megatron.models.qwen3.model import padded_vocab_size, padding_vocab_slice, transformer_config_from_hf
from opsdc_megatron.parallel import init_distributed
from tests.launch import torchrun


def qwen3_config(**overrides: Any) -> dict[str, Any]:
    """A tiny Qwen3 config.json as a dict."""
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 101, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    return {**config, **overrides}


@pytest.mark.parallel
def test_megatron_qwen3_matches_transformers_at_tp1_and_tp2(tmp_path: Path) -> None:
    output = torchrun("model_parity_worker.py", 2, str(tmp_path))
    assert "PARITY OK" in output, output[-3000:]


def test_transformer_config_maps_qwen3_fields() -> None:
    config = transformer_config_from_hf(qwen3_config(rms_norm_eps=1e-5), tensor_parallel_size=2)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 96)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 16)
    assert config.layernorm_epsilon == 1e-5 and config.normalization == "RMSNorm" and config.qk_layernorm
    assert config.gated_linear_unit and not config.add_bias_linear and not config.add_qkv_bias
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    from_transformers = transformer_config_from_hf(Qwen3Config(**qwen3_config(rms_norm_eps=1e-5)), 2)
    assert (from_transformers.kv_channels, from_transformers.layernorm_epsilon) == (16, 1e-5)


@pytest.mark.parametrize(
    ("tensor_parallel_size", "field"),
    [(3, "num_attention_heads"), (4, "num_key_value_heads")],
)
def test_tp_that_does_not_divide_heads_is_rejected(tensor_parallel_size: int, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: expected a multiple of tensor_parallel_size = {tensor_parallel_size}"):
        transformer_config_from_hf(qwen3_config(), tensor_parallel_size=tensor_parallel_size)


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"architectures: expected one of \['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\], got \['MistralForCausalLM'\]"):
        transformer_config_from_hf(qwen3_config(architectures=["MistralForCausalLM"], model_type="mistral"), 1)
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"model_type: expected one of \['llama', 'qwen2', 'qwen3'\]"):
        transformer_config_from_hf(tmp_path, 1)


def test_rope_scaling_is_rejected() -> None:
    config = qwen3_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match=r"rope_type: expected 'default', got 'yarn'"):
        transformer_config_from_hf(config, 1)


def test_padding_vocab_slice_marks_only_padding_columns() -> None:
    assert padded_vocab_size(101, 1) == 101 and padded_vocab_size(101, 2) == 102 and padded_vocab_size(101, 4) == 104
    # TP=4, vocab 101 -> shards of 26 columns; global padding columns are 101, 102, 103.
    assert [padding_vocab_slice(101, 4, rank) for rank in range(4)] == [
        slice(26, 26), slice(26, 26), slice(26, 26), slice(23, 26)
    ]
    assert padding_vocab_slice(100, 4, 3) == slice(25, 25)
    # A shard made of padding only: vocab 5 over TP=8 -> 1 column per rank.
    assert padding_vocab_slice(5, 8, 6) == slice(0, 1)


def test_init_distributed_rejects_sizes_before_starting_process_groups() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by .* = 2 \* 1 = 2"):
        init_distributed(tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size must be >= 1, got 0"):
        init_distributed(tensor_parallel_size=1, pipeline_parallel_size=0)
    assert not dist.is_initialized()
