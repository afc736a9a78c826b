"""Tiny random Hugging Face models of every supported architecture, with the toy tokenizer.

fp32, vocabulary 175 (odd: padded to 176 at TP=2); norms and biases randomised (transformers
initialises them to constants) so that a mistake in mapping any tensor shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

VOCAB = 175
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64,
)
TINY_MODELS = {
    "qwen3_tied": (Qwen3ForCausalLM, Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=True)),
    "qwen3_untied": (Qwen3ForCausalLM, Qwen3Config(**_COMMON, head_dim=8, tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**_COMMON, tie_word_embeddings=False)),
    "llama3": (
        LlamaForCausalLM,
        LlamaConfig(
            **{**_COMMON, "max_position_embeddings": 131072}, tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            },
        ),
    ),
}
SHARDED_INPUT = "qwen3_untied"
"""Saved as several safetensors files with an index (the others as one model.safetensors)."""


def save_tiny_model(name: str, folder: Path, seed: int = 1234) -> Path:
    model_class, config = TINY_MODELS[name]
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif param_name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder, max_shard_size="40KB" if name == SHARDED_INPUT else "1GB")
    build_toy_tokenizer().save_pretrained(folder)
    return folder


def save_toy_qwen3(root: Path, layers: int = 2) -> Path:
    """The loop tests' inputs: a tiny random Qwen3 (tied, seed 0, `layers` decoder layers) with the toy
    tokenizer in root/model, 64 toy training prompts in root/train.jsonl. Returns root."""
    from opsdc_megatron.prompts import write_prompts
    from opsdc_megatron.toy.task import toy_prompts

    tokenizer = build_toy_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_prompts(root / "train.jsonl", toy_prompts(0, 64, "train"))
    return root
