"""SDPAttention (torch's fused SDPA kernels) as megatron-core's attention core: the same logits and
gradients as megatron's own DotProductAttention, grouped-query heads included, in fp32 on CPU; packed
(thd) sequences give what each sequence gives alone.
bench/layer_slice.py measures its speed on a GPU."""

from __future__ import annotations

from itertools import accumulate

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from transformers import Qwen3Config

from opsdc_megatron.models.hf_config import rope_theta
from opsdc_megatron.models.qwen3.model import padded_vocab_size, transformer_config_from_hf
from opsdc_megatron.models.layer_spec import gpt_layer_spec, supports_packed_sequences
from opsdc_megatron.models.sdpa_attention import SDPAttention
from opsdc_megatron.models.transformer_engine import guard_broken_transformer_engine



def _model(backend: str, hf_config: Qwen3Config) -> GPTModel:
    config = transformer_config_from_hf(hf_config, 1)
    return GPTModel(
        config=config, transformer_layer_spec=gpt_layer_spec(backend), vocab_size=padded_vocab_size(hf_config.vocab_size, 1),
        max_sequence_length=64, parallel_output=True, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_base=rope_theta(hf_config),
    )


def test_sdpa_matches_megatron_dot_product_attention(one_rank) -> None:
    hf_config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    reference, fast = _model("local", hf_config), _model("sdpa", hf_config)
    fast.load_state_dict(reference.state_dict())
    assert isinstance(fast.decoder.layers[0].self_attention.core_attention, SDPAttention)
    tokens = torch.randint(0, 97, (3, 19), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(19).expand_as(tokens)
    outputs = []
    for model in (reference, fast):
        logits = model(tokens, positions, attention_mask=None)
        (logits.square().mean()).backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = outputs
    assert torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_unsupported_settings_are_named(one_rank) -> None:
    config = transformer_config_from_hf(Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16), 1)
    with pytest.raises(ValueError, match="causal self-attention only"):
        SDPAttention(config, 1, AttnMaskType.padding, "self")
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    q = torch.zeros(5, 1, 4, 16)
    with pytest.raises(ValueError, match="no attention mask"):
        attention(q, q[:, :, :2], q[:, :, :2], attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention backend must be"):
        gpt_layer_spec("flash")


def _packing(lengths: list[int]) -> PackedSeqParams:
    cu_seqlens = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def test_packed_sequences_attend_each_to_itself(one_rank) -> None:
    """thd: packed sequences through the whole model (megatron's per-sequence RoPE, SDPAttention per
    sequence) give each sequence's logits and gradients as if it ran alone; one-token sequences included."""
    hf_config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    alone, packed = _model("sdpa", hf_config), _model("sdpa", hf_config)
    packed.load_state_dict(alone.state_dict())
    lengths = [7, 1, 12, 3]
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 97, (1, length), generator=generator) for length in lengths]
    weights = torch.randn(sum(lengths), 97, generator=generator)  # a loss that weighs every logit differently

    separate = torch.cat([alone(s, torch.arange(s.shape[1])[None], attention_mask=None)[0] for s in sequences])
    (separate * weights).sum().backward()
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    together = packed(torch.cat(sequences, dim=1), positions, attention_mask=None, packed_seq_params=_packing(lengths))[0]
    (together * weights).sum().backward()

    assert together.shape == separate.shape
    assert torch.allclose(together, separate, rtol=1e-5, atol=1e-6)
    for (name, parameter), reference in zip(packed.named_parameters(), alone.parameters()):
        # fp32 sums in another order (threads, per-sequence calls): rounding relative to the largest entry
        scale = reference.grad.abs().max().item()
        assert torch.allclose(parameter.grad, reference.grad, rtol=1e-4, atol=1e-6 * max(1.0, scale)), name
    # Not vacuous: the same tokens in one causal row (no boundaries) read across sequences.
    unbounded = alone(torch.cat(sequences, dim=1), positions, attention_mask=None)[0]
    assert not torch.allclose(unbounded[lengths[0]:].detach(), separate[lengths[0]:].detach(), atol=1e-3)


def test_packed_attention_core_matches_each_sequence_and_checks_its_input(one_rank) -> None:
    """The core alone, grouped-query heads: [t, heads, d] packed against [s, 1, heads, d] per sequence."""
    config = transformer_config_from_hf(Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16), 1)
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    lengths = [4, 1, 6]
    generator = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(sum(lengths), heads, 16, generator=generator) for heads in (4, 2, 2))
    packed = attention(query, key, value, attention_mask=None, packed_seq_params=_packing(lengths))
    assert packed.shape == (sum(lengths), 4 * 16)
    start = 0
    for length in lengths:
        span = slice(start, start + length)
        alone = attention(query[span, None], key[span, None], value[span, None], attention_mask=None)
        assert torch.allclose(packed[span], alone[:, 0], rtol=1e-6, atol=1e-6)
        start += length
    with pytest.raises(ValueError, match="thd format only"):
        attention(query, key, value, attention_mask=None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    with pytest.raises(ValueError, match="do not cover"):
        attention(query, key, value, attention_mask=None, packed_seq_params=_packing([4, 1]))
    padded = _packing(lengths)
    padded.cu_seqlens_q_padded = padded.cu_seqlens_kv_padded = padded.cu_seqlens_q
    with pytest.raises(ValueError, match="padded packed sequences"):
        attention(query, key, value, attention_mask=None, packed_seq_params=padded)


def test_packing_follows_the_attention_backend() -> None:
    """`opsdc train` packs micro-batches (train.micro_batch_tokens) only where attention takes packed sequences."""
    assert supports_packed_sequences("sdpa") and not supports_packed_sequences("local")
    te_available = guard_broken_transformer_engine().available
    assert supports_packed_sequences("auto") == (te_available or torch.cuda.is_available())
    if not te_available:
        with pytest.raises(ValueError, match="'te' needs Transformer Engine"):
            supports_packed_sequences("te")


@pytest.mark.parametrize("backend", ["local", "sdpa"])
def test_final_norm_is_the_layers_norm_whatever_imports(one_rank, monkeypatch, backend) -> None:
    """megatron picks a bare layer spec's final norm by what imports: apex's FusedLayerNorm where
    apex does and Transformer Engine does not. FusedLayerNorm is LayerNorm only, so the RMSNorm
    models would fail to build there. That choice is forced here (apex is not installed); the
    decoder spec must give the final norm the layers' own class."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer import transformer_block

    from opsdc_megatron.models.qwen3.model import build_gpt_model

    monkeypatch.setattr(transformer_block, "LayerNormImpl", FusedLayerNorm)
    hf_config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = build_gpt_model(hf_config, 1, attention_backend=backend)
    assert type(model.decoder.final_layernorm) is type(model.decoder.layers[0].input_layernorm)
    assert "final_layernorm.weight" in dict(model.decoder.named_parameters())
