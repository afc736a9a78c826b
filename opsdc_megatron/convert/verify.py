"""The largest logit difference between a HF folder and a megatron checkpoint on the same tokens.

transformers (eager attention) and megatron-core (TP=1, loaded with `load_model_weights`, the
loader `opsdc train` uses) both run in fp32 on the same random token ids; the vocabulary padding
of the megatron logits is dropped. Their kernels differ (fused QKV and gate/up matmuls, norms,
attention), so a correct conversion's logits differ by about 1e-6 of their size: a trained model's
logits of 20-40 differ by a few 1e-5. A wrong tensor differs by the order of the logits themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from opsdc_megatron.models.hf_config import load_hf_config
from opsdc_megatron.models.qwen3.model import build_gpt_model
from opsdc_megatron.train.checkpoint import load_model_weights


@dataclass(frozen=True)
class LogitDifference:
    largest: float
    """max |megatron logit - transformers logit|"""
    largest_logit: float
    """max |transformers logit|"""

    @property
    def relative(self) -> float:
        return self.largest / self.largest_logit if self.largest_logit else self.largest


def logit_difference(hf_dir: Path, ckpt: Path, sequences: int = 2, tokens_per_sequence: int = 32, seed: int = 0) -> LogitDifference:
    """Collective over megatron's groups at TP=1, PP=1 (initialised by the caller)."""
    config = load_hf_config(hf_dir)
    tokens_per_sequence = min(tokens_per_sequence, config.max_position_embeddings)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (sequences, tokens_per_sequence), generator=generator)
    positions = torch.arange(tokens_per_sequence).unsqueeze(0).expand_as(tokens)

    megatron_model = build_gpt_model(config, 1, 1, params_dtype=torch.float32)
    load_model_weights(ckpt, [megatron_model])
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    device = next(megatron_model.parameters()).device  # a GPU where there is one
    with torch.no_grad():
        megatron_logits = megatron_model.eval()(tokens.to(device), positions.to(device), None)[..., : config.vocab_size].cpu()
        hf_logits = hf_model.eval()(tokens).logits
    return LogitDifference((megatron_logits - hf_logits).abs().max().item(), hf_logits.abs().max().item())
