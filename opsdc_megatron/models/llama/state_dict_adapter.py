"""Llama 3 names between Hugging Face and megatron-core: Qwen3's map without QK-norm.

The layouts and conversions are shared by every architecture (`models.qwen3.state_dict_adapter`).
"""

from __future__ import annotations

from opsdc_megatron.models.qwen3.state_dict_adapter import NameMap

NAME_MAP: NameMap = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.layers.{i}.input_layernorm.weight": ("replicated", ("model.layers.{i}.input_layernorm.weight",)),
    "decoder.layers.{i}.self_attention.linear_qkv.weight": (
        "qkv",
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
    ),
    "decoder.layers.{i}.self_attention.linear_proj.weight": ("row", ("model.layers.{i}.self_attn.o_proj.weight",)),
    "decoder.layers.{i}.pre_mlp_layernorm.weight": ("replicated", ("model.layers.{i}.post_attention_layernorm.weight",)),
    "decoder.layers.{i}.mlp.linear_fc1.weight": (
        "gate_up",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ),
    "decoder.layers.{i}.mlp.linear_fc2.weight": ("row", ("model.layers.{i}.mlp.down_proj.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}
