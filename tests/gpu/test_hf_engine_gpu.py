"""The in-process rollout engine on a CUDA GPU, where it generates by default: the same greedy
tokens as on the CPU (fp32), and a weight push from host tensors reaches the GPU copy. CI has no
GPU and deselects these (`-m "not gpu"`); tests/test_rollout_engine.py covers the engine on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.rollout.hf_engine import HFRolloutEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_greedy_rollouts_on_the_gpu_match_the_cpu() -> None:
    config = Qwen3Config(vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    weights = Qwen3ForCausalLM(config).float().state_dict()
    engines = {device: HFRolloutEngine(config, [1], 0, torch.float32, device) for device in ("cpu", None)}
    assert engines[None].device.type == "cuda"
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=12)
    responses = {}
    for device, engine in engines.items():
        engine.update_weights({k: v for k, v in weights.items() if k != "lm_head.weight"}, version=3)
        responses[device] = [(r.response_ids, r.finish_reason, r.weight_version) for r in engine.generate(prompts, greedy, seed=0)]
    assert responses[None] == responses["cpu"]
    assert all(version == 3 for _, _, version in responses[None])
