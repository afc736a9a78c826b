"""Which transformer layer a GPTModel is built from: Transformer Engine's when it imports, else
megatron-core's local layer with a choice of attention core."""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from opsdc_megatron.models.sdpa_attention import SDPAttention
from opsdc_megatron.models.transformer_engine import guard_broken_transformer_engine

ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")
"""auto: Transformer Engine's layer when TE imports, else sdpa on a GPU and local on CPU; te: require
it; sdpa: the local layer with torch's fused SDPA (``SDPAttention``, 1.9x faster than local on an
H200); local: megatron-core's DotProductAttention (the reference; on CPU, where SDPA brings no speed,
it keeps tensor-parallel runs bit-for-bit closer to TP=1)."""


PACKED_SEQUENCE_BACKENDS = ("te", "sdpa")
"""Backends whose attention takes packed sequences (``PackedSeqParams``, thd); megatron's local
DotProductAttention does not."""


def resolve_attention_backend(attention_backend: str) -> str:
    """The backend a layer is built with: te, sdpa or local ("auto" decided here, see ATTENTION_BACKENDS).

    Raises:
        ValueError: an unknown backend, or "te" without a working Transformer Engine.
    """
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
    if attention_backend in ("auto", "te"):
        status = guard_broken_transformer_engine()
        if status.available:
            return "te"
        if attention_backend == "te":
            raise ValueError(f"attention backend 'te' needs Transformer Engine: {status.reason}")
        return "sdpa" if torch.cuda.is_available() else "local"
    return attention_backend


def supports_packed_sequences(attention_backend: str) -> bool:
    """Whether micro-batches can be packed (distill/batch.py) for this backend, "auto" resolved here."""
    return resolve_attention_backend(attention_backend) in PACKED_SEQUENCE_BACKENDS


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm built from a TransformerConfig, as megatron's WrappedTorchNorm builds it for the
    local layer, but also under sequence parallelism, which WrappedTorchNorm refuses. There each
    tensor-parallel rank normalizes its own slice of the sequence, so the weight's gradient is partial;
    the ``sequence_parallel`` mark makes megatron's finalize_model_grads all-reduce it over the
    tensor-parallel group, as Transformer Engine's norms are marked."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def gpt_layer_spec(attention_backend: str = "auto", qk_layernorm: bool = True) -> ModuleSpec:
    """The layer spec for RMSNorm decoders (QK-norm for Qwen3) with the chosen attention backend."""
    backend = resolve_attention_backend(attention_backend)
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm"))
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    if backend == "sdpa":
        attention.core_attention = SDPAttention
    return spec


def gpt_decoder_spec(
    attention_backend: str, qk_layernorm: bool, config: TransformerConfig, vp_stage: int | None = None
) -> ModuleSpec:
    """This pipeline stage's decoder block of `gpt_layer_spec` layers.

    For the local layers (local, sdpa) the block's final norm is the layers' own norm class. Given a
    bare layer spec, megatron picks the final norm by what imports: Transformer Engine's norm when TE
    does, and apex's FusedLayerNorm when only apex does. FusedLayerNorm is LayerNorm only, so it
    fails on these RMSNorm models.
    """
    backend = resolve_attention_backend(attention_backend)
    layer = gpt_layer_spec(backend, qk_layernorm)
    if backend == "te":
        return layer
    layers = [layer] * get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=layer.submodules.input_layernorm))
