"""Qwen3 on megatron-core: parity with transformers, state-dict round trips, and input checks.

The multi-process checks (logits, export, optimizer step at TP=1 vs TP=2, dist_checkpointing)
share one 2-process launch: see tests/workers/model_parity_worker.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
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


def llama3_config(**rope: Any) -> dict[str, Any]:
    """A tiny Llama 3.1 config.json as a dict, its RoPE scaling overridden by `rope`."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return qwen3_config(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0, max_position_embeddings=131072,
                        tie_word_embeddings=False, rope_scaling={**scaling, **rope})


@pytest.mark.parametrize(("config", "message"), [
    (qwen3_config(hidden_act="gelu"), "hidden_act: expected 'silu', got 'gelu'"),
    (qwen3_config(mlp_bias=True), "mlp_bias: expected false, got true"),
    (qwen3_config(attention_bias=True), "attention_bias: expected false, got true"),
    (qwen3_config(use_sliding_window=True), "use_sliding_window: expected false, got true"),
    (qwen3_config(partial_rotary_factor=0.5), "partial_rotary_factor: expected 1.0 (RoPE on the whole head), got 0.5"),
    (qwen3_config(attention_dropout=0.1), "attention_dropout: expected 0.0 (training here runs without dropout), got 0.1"),
    (llama3_config(original_max_position_embeddings=4096), "rope_parameters.original_max_position_embeddings: expected 8192 (megatron-core's fixed value), got 4096"),
    (llama3_config(low_freq_factor=2.0), "rope_parameters.low_freq_factor: expected 1.0"),
    (qwen3_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}), "rope_type: expected 'default', got 'llama3'"),
])
def test_config_fields_the_model_would_not_honour_are_refused(config: dict[str, Any], message: str) -> None:
    """Each of these changes what the model computes; built anyway, megatron's model would silently differ from HF's."""
    with pytest.raises(ValueError, match=re.escape(message)):
        transformer_config_from_hf(config, 1)
    transformer_config_from_hf(llama3_config(), 1)  # the shipped Llama 3.1 settings are honoured


def test_llama3_rope_scaling_gives_transformers_frequencies() -> None:
    """Llama 3.1's scaling changes only wavelengths over 2048 tokens, which short parity prompts barely see
    (dropping it moved 32-token logits by 3e-5): the frequencies are compared instead."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from opsdc_megatron.models.qwen3.model import build_gpt_model
    from opsdc_megatron.parallel import destroy_distributed
    from tests.tiny_models import TINY_MODELS

    _, config = TINY_MODELS["llama3"]
    unscaled = type(config)(**{**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    init_distributed(tensor_parallel_size=1)
    try:
        scaled_freq, plain_freq = (build_gpt_model(c, 1).rotary_pos_emb.inv_freq for c in (config, unscaled))
    finally:
        destroy_distributed()
    assert torch.equal(scaled_freq.float(), LlamaRotaryEmbedding(config=config).inv_freq.float())
    assert (scaled_freq - plain_freq).abs().max() > 1e-4  # the scaling is there to see
