"""A fast attention core for megatron-core's local (non-Transformer-Engine) layer spec.

megatron-core's local spec computes attention the textbook way (``DotProductAttention``): it
repeats the key/value heads for grouped-query attention, materializes the ``[b, heads, s, s]``
scores, and runs a separate softmax and two batched matmuls. Without Transformer Engine that made
4 Qwen3-8B layers 1.8x slower than Hugging Face transformers on an H200 (FACTS.md section 3).
``SDPAttention`` keeps the module's interface (same constructor and forward signature, same
``[s, b, heads * head_dim]`` output) and calls ``torch.nn.functional.scaled_dot_product_attention``,
which picks FlashAttention-2 or memory-efficient kernels on GPUs (with native grouped-query heads)
and a math path on CPU.

Supported: causal self-attention without a mask tensor (what OPSDC's right-padded micro-batches
use), dropout, and packed sequences (megatron's ``PackedSeqParams`` with ``qkv_format="thd"``, what
packed micro-batches use; distill/batch.py). Anything else raises with the reason.

Packed sequences: megatron's Attention hands the core ``[tokens, heads, head_dim]`` tensors (the
batch axis squeezed) with the cumulative sequence lengths; each sequence attends causally to itself
only. This runs one SDPA call per sequence, on views of the packed tensors: every call keeps the
fused (FlashAttention / memory-efficient) kernel and costs O(length^2) for its own sequence,
whereas one call with a block-diagonal causal mask would build a [tokens, tokens] mask and drop to
the kernels that take a mask tensor, with the compute of the whole square. Reading the boundaries
takes one device-to-host copy per layer, as megatron's unfused thd RoPE does anyway; micro-batches
pack few long rollouts, so the per-call launch overhead stays small.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

class SDPAttention(MegatronModule):
    """Drop-in core attention for megatron-core's local spec, on torch's fused SDPA kernels."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal self-attention only, got {attn_mask_type}")
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not split the sequence: context_parallel_size must be 1")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention supports the vanilla softmax only, got {config.softmax_type}")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim), as megatron's
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """``[s, b, heads, head_dim]`` query and ``[s, b, groups, head_dim]`` key/value to ``[s, b, heads * head_dim]``;
        packed (thd): ``[t, heads, head_dim]`` and ``[t, groups, head_dim]`` to ``[t, heads * head_dim]``."""
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes no attention mask or bias (causal only)")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = self._attend(q, k, v)
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal SDPA on ``[b, heads, s, d]`` query and ``[b, groups, s, d]`` key/value."""
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
        )

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, packing: Any) -> Tensor:
        """Causal attention within each packed sequence (see the module docstring)."""
        if packing.qkv_format != "thd":
            raise ValueError(f"SDPAttention takes packed sequences in the thd format only, got {packing.qkv_format!r}")
        if packing.cu_seqlens_q_padded is not None or packing.cu_seqlens_kv_padded is not None:
            raise ValueError("SDPAttention does not take padded packed sequences (cu_seqlens_*_padded)")
        if packing.cu_seqlens_kv is not packing.cu_seqlens_q and not torch.equal(packing.cu_seqlens_q, packing.cu_seqlens_kv):
            raise ValueError("SDPAttention packed self-attention needs cu_seqlens_q == cu_seqlens_kv")
        boundaries = packing.cu_seqlens_q.tolist()
        if boundaries[0] != 0 or boundaries[-1] != query.shape[0]:
            raise ValueError(f"packed sequence boundaries {boundaries} do not cover the {query.shape[0]} tokens")
        # [t, n, d] -> [n, t, d]; each sequence a [1, n, length, d] view
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        contexts = [
            self._attend(q[None, :, start:end], k[None, :, start:end], v[None, :, start:end])[0]
            for start, end in zip(boundaries[:-1], boundaries[1:])
        ]
        # [n, t, d] -> [t, n * d]
        return torch.cat(contexts, dim=1).transpose(0, 1).reshape(query.shape[0], -1)
