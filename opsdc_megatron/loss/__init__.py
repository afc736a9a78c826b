"""Divergences between student and teacher logits, exact over the tensor-parallel-sharded vocabulary."""

from opsdc_megatron.loss.fused_output import fused_output_reverse_kl
from opsdc_megatron.loss.reverse_kl import vocab_parallel_forward_kl, vocab_parallel_reverse_kl

__all__ = ["vocab_parallel_reverse_kl", "vocab_parallel_forward_kl", "fused_output_reverse_kl"]
