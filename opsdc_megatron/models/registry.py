"""The Hugging Face architectures this project maps onto megatron-core's GPTModel.

One entry per architecture: its transformers config class, its literal HF <-> megatron name map
(the one used by `load_hf_weights`, `export_hf_state_dict`, checkpoint conversion and the weight
push), and the two switches that tell the architectures apart in megatron terms.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

if TYPE_CHECKING:
    from opsdc_megatron.models.qwen3.state_dict_adapter import NameMap


@dataclass(frozen=True)
class Architecture:
    name: str
    """The HF ``architectures`` entry, e.g. Qwen3ForCausalLM."""
    model_type: str
    config_class: type[PretrainedConfig]
    state_dict_adapter: str
    """The module of its name map (NAME_MAP), imported at first use: the maps sit beside the conversion code,
    which imports megatron-core, and reading or checking a config (`opsdc train`'s preflight) needs none of it."""
    qk_layernorm: bool
    """RMSNorm on queries and keys per head (Qwen3)."""
    qkv_bias: bool
    """Biases on the q/k/v projections (Qwen2/2.5)."""

    @property
    def name_map(self) -> NameMap:
        return importlib.import_module(self.state_dict_adapter).NAME_MAP


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("Qwen3ForCausalLM", "qwen3", Qwen3Config, "opsdc_megatron.models.qwen3.state_dict_adapter", qk_layernorm=True, qkv_bias=False),
        Architecture("Qwen2ForCausalLM", "qwen2", Qwen2Config, "opsdc_megatron.models.qwen2.state_dict_adapter", qk_layernorm=False, qkv_bias=True),
        Architecture("LlamaForCausalLM", "llama", LlamaConfig, "opsdc_megatron.models.llama.state_dict_adapter", qk_layernorm=False, qkv_bias=False),
    )
}


def architecture_of(config: dict[str, Any]) -> Architecture:
    """The supported architecture a parsed config.json describes.

    Raises:
        ValueError: unsupported ``architectures`` (or ``model_type`` when there is none).
    """
    supported = sorted(ARCHITECTURES)
    architectures = config.get("architectures")
    if architectures:
        if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            raise ValueError(f"architectures: expected one of {supported}, got {architectures!r}")
        return ARCHITECTURES[architectures[0]]
    by_type = {arch.model_type: arch for arch in ARCHITECTURES.values()}
    if config.get("model_type") not in by_type:
        raise ValueError(
            f"model_type: expected one of {sorted(by_type)} (config has no 'architectures'), got {config.get('model_type')!r}"
        )
    return by_type[config["model_type"]]
