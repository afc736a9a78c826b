"""SDPAttention (torch's fused SDPA kernels) as megatron-core's attention core: the same logits and
gradients as megatron's own DotProductAttention, grouped-query heads included, in fp32 on CPU.
bench/layer_slice.py measures its speed on a GPU."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from transformers import Qwen3Config

from opsdc_megatron.models.qwen3.model import _rope_theta, padded_vocab_size, transformer_config_from_hf
from opsdc_megatron.models.layer_spec import gpt_layer_spec
from opsdc_megatron.models.sdpa_attention import SDPAttention
from opsdc_megatron.parallel import destroy_distributed, init_distributed

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def one_rank():
    init_distributed(1, 1, seed=0)
    yield
    destroy_distributed()


def _model(backend: str, hf_config: Qwen3Config) -> GPTModel:
    config = transformer_config_from_hf(hf_config, 1)
    return GPTModel(
        config=config, transformer_layer_spec=gpt_layer_spec(backend), vocab_size=padded_vocab_size(hf_config.vocab_size, 1),
        max_sequence_length=64, parallel_output=True, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_base=_rope_theta(hf_config),
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
