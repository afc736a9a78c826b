"""Qwen3, Qwen2/2.5 and Llama 3 as a megatron-core GPTModel: the model provider for training and scoring.

Built from a Hugging Face ``config.json`` with Transformer Engine's layer where TE imports and
megatron-core's "local" layer with torch SDPA attention elsewhere (`models/layer_spec.py`), so it
runs wherever megatron-core imports (CPU machines included). The three
architectures (`opsdc_megatron.models.registry`) are one megatron model with a few switches:

* pre-norm decoder with RMSNorm (HF ``rms_norm_eps``), no biases except Qwen2's on q/k/v
  (``add_qkv_bias``);
* grouped-query attention (``num_query_groups`` = HF ``num_key_value_heads``) with an explicit
  ``head_dim`` (``kv_channels``; Qwen3's is not hidden_size / heads); Qwen3 alone has RMSNorm on
  queries and keys per head before RoPE (``qk_layernorm``); RoPE base ``rope_theta``,
  non-interleaved halves, plus Llama 3.1's frequency scaling where the config asks for it;
* SwiGLU MLP (``gated_linear_unit`` with SiLU);
* input embedding and output layer tied when ``tie_word_embeddings``.

The vocabulary is padded to a multiple of the tensor-parallel size so every rank holds an equal
logits shard; `padding_vocab_slice` tells a rank which of its logits columns are that padding.
Dropout is 0, as in the released configs and OPSDC training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from opsdc_megatron.models.hf_config import HFConfigLike, check_hf_config, head_dim, llama3_rope_scaling_factor, load_hf_config, rope_theta
from opsdc_megatron.models.layer_spec import gpt_decoder_spec
from opsdc_megatron.models.registry import Architecture, architecture_of
from opsdc_megatron.models.transformer_engine import FP8Config, fp8_transformer_config_fields


def transformer_config_from_hf(
    hf_config: HFConfigLike,
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    virtual_pipeline_chunks: int = 1,
) -> TransformerConfig:
    """The megatron TransformerConfig equivalent to a Hugging Face config of a supported architecture.

    `virtual_pipeline_chunks` > 1 splits each pipeline rank's layers into that many model chunks
    (megatron's interleaved 1F1B schedule).

    Raises:
        ValueError: a field the parallel sizes do not divide, or an unsupported architecture or feature.
    """
    config = check_hf_config(hf_config, tensor_parallel_size, pipeline_parallel_size, virtual_pipeline_chunks)
    architecture = architecture_of(config.to_dict())
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype: expected float32, bfloat16 or float16, got {params_dtype}")

    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=head_dim(config),
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        qk_layernorm=architecture.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=architecture.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=config.initializer_range,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        virtual_pipeline_model_parallel_size=virtual_pipeline_chunks if virtual_pipeline_chunks > 1 else None,
        # Each micro-batch sends its own [tokens, sequences, hidden] shape between pipeline stages:
        # micro-batches differ in length (rollouts vary; teacher and student streams travel together).
        variable_seq_lengths=True,
        # No MoE here, but megatron-core 0.16 rejects variable_seq_lengths with its default MoE
        # dispatcher ("allgather") even in dense models.
        moe_token_dispatcher_type="alltoall",
        # gloo matches point-to-point messages between two ranks in posting order and without tags.
        # Batched p2p posts (send prev, recv prev, send next, recv next) on every rank, so with two
        # pipeline ranks (prev = next) the interleaved schedule would receive an activation as a
        # gradient and vice versa. The unbatched path orders sends and receives by even/odd rank.
        batch_p2p_comm=not on_cpu,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        # Fusions that need apex, Transformer Engine or custom CUDA kernels, none of which the
        # local spec can rely on; the unfused paths compute the same function.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Vocabulary rows of the embedding and output layer: rounded up to a multiple of the TP size."""
    return -(-vocab_size // tensor_parallel_size) * tensor_parallel_size


def output_weight(gpt: GPTModel) -> torch.Tensor:
    """This rank's shard of the output layer's weight: the embedding's when tied (megatron's
    `shared_embedding_or_output_weight` returns the embedding on a first stage even when untied)."""
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight


def padding_vocab_slice(
    vocab_size: int,
    tensor_parallel_size: int | None = None,
    tensor_parallel_rank: int | None = None,
) -> slice:
    """Columns of this TP rank's logits shard that are vocabulary padding (maybe an empty slice).

    Use it as ``logits[..., padding_vocab_slice(hf_vocab_size)] = float("-inf")`` before a softmax
    over the vocabulary. Rank and size default to megatron's tensor-parallel group.
    """
    if tensor_parallel_size is None:
        tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    if tensor_parallel_rank is None:
        tensor_parallel_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = padded_vocab_size(vocab_size, tensor_parallel_size) // tensor_parallel_size
    first_padding = vocab_size - tensor_parallel_rank * shard
    return slice(min(max(first_padding, 0), shard), shard)


def build_gpt_model(
    hf_config: HFConfigLike,
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    virtual_pipeline_chunks: int = 1,
    vp_stage: int | None = None,
    *,
    attention_backend: str = "auto",
    fp8: FP8Config | None = None,
    activation_recompute: str = "none",
    sequence_parallel: bool = False,
    empty_on_host: bool = False,
) -> GPTModel:
    """One megatron GPTModel chunk for a supported HF config (weights randomly initialised).

    Needs megatron's parallel groups (`opsdc_megatron.parallel.init_distributed`). Forward without
    labels returns [batch, sequence, padded_vocab / TP] logits; load weights with
    `state_dict_adapter.load_hf_weights`. The model carries ``hf_vocab_size`` (the unpadded
    vocabulary) and ``hf_name_map`` (its architecture's HF <-> megatron name map) for the
    state-dict adapter.

    ``attention_backend`` picks the layer (`layer_spec.gpt_layer_spec`: Transformer Engine's when it
    imports, else the local layer with torch SDPA attention); ``fp8`` needs Transformer Engine;
    ``activation_recompute="full"`` keeps only each layer's input for backward; ``sequence_parallel``
    splits the activations between the tensor-parallel matmuls along the sequence. On a GPU megatron's
    torch.compile'd SwiGLU is used. All parameters, norms included, are cast to ``params_dtype``
    (as megatron's Float16Module does) so bf16 RMSNorm runs torch's fused kernel.
    ``empty_on_host=True`` allocates the parameters in CPU memory and leaves them uninitialised: for
    the offloaded teacher, whose weights are copied in and must never fill the GPU as a whole.
    """
    config = load_hf_config(hf_config)
    architecture: Architecture = architecture_of(config.to_dict())
    transformer_config = transformer_config_from_hf(
        config, tensor_parallel_size, pipeline_parallel_size, params_dtype, virtual_pipeline_chunks
    )
    overrides: dict[str, object] = dict(fp8_transformer_config_fields(fp8 or FP8Config()))
    if activation_recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif activation_recompute != "none":
        raise ValueError(f"activation_recompute: expected none or full, got {activation_recompute!r}")
    if sequence_parallel:
        overrides["sequence_parallel"] = True
    if torch.cuda.is_available():
        overrides["bias_activation_fusion"] = True
    if empty_on_host:
        overrides.update(use_cpu_initialization=True, perform_initialization=False)
    if overrides:
        transformer_config = dataclasses.replace(transformer_config, **overrides)
    rope_scaling_factor = llama3_rope_scaling_factor(config)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=gpt_decoder_spec(attention_backend, architecture.qk_layernorm, transformer_config, vp_stage),
        vocab_size=padded_vocab_size(config.vocab_size, tensor_parallel_size),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(config),
        rope_scaling=rope_scaling_factor is not None,
        rope_scaling_factor=rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    # megatron allocates its linear layers on the GPU, but torch's RMSNorm (the local spec's norm) on
    # the default device: put every tensor on the GPU, except for a model kept in host memory.
    on_gpu = torch.cuda.is_available() and not empty_on_host
    model.to(device=torch.cuda.current_device() if on_gpu else None, dtype=params_dtype)
    model.hf_vocab_size = config.vocab_size
    model.hf_name_map = architecture.name_map
    return model


def build_model_chunks(
    hf_config: HFConfigLike,
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    virtual_pipeline_chunks: int = 1,
    **model_options: Any,
) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving).
    ``model_options``: the keyword options of `build_gpt_model` (attention backend, FP8, recompute).

    Chunk i holds the layers megatron assigns to virtual stage i of this pipeline rank; only the
    first chunk of the first rank embeds tokens and only the last chunk of the last rank has the
    output layer. Needs megatron's parallel groups (`init_distributed` with the same sizes).
    """
    interleaved = virtual_pipeline_chunks > 1
    return [
        build_gpt_model(
            hf_config, tensor_parallel_size, pipeline_parallel_size, params_dtype,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=chunk if interleaved else None),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=chunk if interleaved else None),
            virtual_pipeline_chunks=virtual_pipeline_chunks,
            vp_stage=chunk if interleaved else None,
            **model_options,
        )
        for chunk in range(virtual_pipeline_chunks)
    ]
