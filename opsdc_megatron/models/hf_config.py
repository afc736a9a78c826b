"""A Hugging Face model config, read and checked against a parallel layout without megatron-core.

`opsdc train` and the SLURM job script check a recipe's model with `check_hf_config` before any trainer
process starts; importing megatron-core for that took seconds of every launch. `models/qwen3/model.py`
builds the megatron TransformerConfig from the same checked config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from opsdc_megatron.models.registry import architecture_of

HFConfigLike = str | os.PathLike | dict | PretrainedConfig
"""A Hugging Face model folder, its config.json, the parsed json, or a transformers config."""


def load_hf_config(hf_config: HFConfigLike) -> PretrainedConfig:
    """Read and check a config of a supported architecture from any `HFConfigLike`.

    Raises:
        ValueError: the config is not one of `registry.ARCHITECTURES`.
    """
    if isinstance(hf_config, PretrainedConfig):
        architecture_of(hf_config.to_dict())
        return hf_config
    if isinstance(hf_config, (str, os.PathLike)):
        path = Path(hf_config)
        file = path / "config.json" if path.is_dir() else path
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
            return architecture_of(values).config_class.from_dict(values)
        except ValueError as error:  # JSONDecodeError is one
            raise ValueError(f"{file}: {error}") from None
    return architecture_of(hf_config).config_class.from_dict(hf_config)


def head_dim(config: PretrainedConfig) -> int:
    """Qwen3 and Llama carry ``head_dim``; Qwen2 derives it from the hidden size."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    params = config.rope_parameters
    return dict(params, rope_type=params.get("rope_type", params.get("type", "default")))


# Llama 3.1's frequency scaling as megatron-core implements it (RotaryEmbedding._apply_scaling):
# only `factor` is a parameter there, the other three are fixed to these values.
_LLAMA3_FIXED_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_theta(config: PretrainedConfig) -> float:
    """RoPE base. Plain RoPE, or (Llama only) Llama 3.1 scaling with megatron's fixed parameters."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "llama3" and architecture_of(config.to_dict()).name == "LlamaForCausalLM":
        for key, expected in _LLAMA3_FIXED_ROPE.items():
            if float(params.get(key, -1)) != expected:
                raise ValueError(f"rope_parameters.{key}: expected {expected} (megatron-core's fixed value), got {params.get(key)!r}")
    elif rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type: expected 'default', got {rope_type!r}")
    return float(params["rope_theta"])


def llama3_rope_scaling_factor(config: PretrainedConfig) -> float | None:
    """Llama 3.1 scaling factor, or None for plain RoPE."""
    params = rope_parameters(config)
    return float(params["factor"]) if params["rope_type"] == "llama3" else None


def _require_divisible(field: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(
            f"{field}: expected a multiple of {divisor_name} = {divisor}, got {value}"
        )


def check_hf_config(
    hf_config: HFConfigLike, tensor_parallel_size: int, pipeline_parallel_size: int = 1, virtual_pipeline_chunks: int = 1
) -> PretrainedConfig:
    """The config of a supported architecture, once the parallel sizes divide it and every feature it asks
    for is one the megatron model implements.

    Raises:
        ValueError: a field the parallel sizes do not divide, or an unsupported architecture or feature.
    """
    for name, size in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
        ("virtual_pipeline_chunks", virtual_pipeline_chunks),
    ):
        if size < 1:
            raise ValueError(f"{name}: expected >= 1, got {size}")
    config = load_hf_config(hf_config)
    architecture = architecture_of(config.to_dict())
    _require_divisible("num_attention_heads", config.num_attention_heads, "tensor_parallel_size", tensor_parallel_size)
    _require_divisible("num_key_value_heads", config.num_key_value_heads, "tensor_parallel_size", tensor_parallel_size)
    _require_divisible("num_attention_heads", config.num_attention_heads, "num_key_value_heads", config.num_key_value_heads)
    _require_divisible("intermediate_size", config.intermediate_size, "tensor_parallel_size", tensor_parallel_size)
    _require_divisible(
        "num_hidden_layers", config.num_hidden_layers,
        "pipeline_parallel_size * virtual_pipeline_chunks", pipeline_parallel_size * virtual_pipeline_chunks,
    )
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act: expected 'silu', got {config.hidden_act!r}")
    if getattr(config, "attention_bias", False) and not architecture.qkv_bias:
        raise ValueError("attention_bias: expected false, got true")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias: expected false, got true")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window: expected false, got true")
    partial_rotary = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial_rotary not in (None, 1, 1.0):  # megatron's rotary_percent is 1 here
        raise ValueError(f"partial_rotary_factor: expected 1.0 (RoPE on the whole head), got {partial_rotary!r}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout: expected 0.0 (training here runs without dropout), got {config.attention_dropout!r}")
    rope_theta(config)  # rejects RoPE scaling megatron-core does not implement
    return config
