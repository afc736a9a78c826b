"""The in-process transformers engine: pure temperature sampling, weight pushes, stop handling."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.rollout.engine import SamplingParams, generate_across_ranks
from opsdc_megatron.rollout.hf_engine import HFRolloutEngine

VOCAB = 300


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    return config, Qwen3ForCausalLM(config).state_dict()


def engine_for(tiny, stop):
    config, weights = tiny
    engine = HFRolloutEngine(config, stop_token_ids=stop, pad_token_id=0)
    engine.update_weights(weights, version=3)
    return engine


def test_no_hidden_top_k(tiny):
    """transformers defaults to top_k=50; top_k=0 must sample the full softmax."""
    engine = engine_for(tiny, stop=[1])
    rollouts = engine.generate([[5, 6, 7]] * 256, SamplingParams(1.0, 1.0, 0, 1), seed=0)
    assert len({r.response_ids[0] for r in rollouts}) > 100
    capped = engine.generate([[5, 6, 7]] * 256, SamplingParams(1.0, 1.0, 20, 1), seed=0)
    assert len({r.response_ids[0] for r in capped}) <= 20


def test_temperature_and_top_p_reach_the_sampler(tiny):
    """Every other test samples at temperature 1 and top_p 1 (or greedily): an engine that dropped the
    recipe's eval settings (0.6 / 0.95 / 20) would pass them. Near-zero temperature gives the argmax;
    top_p keeps the smallest set of tokens holding that much probability."""
    config, weights = tiny
    engine = engine_for(tiny, stop=[1])
    model = Qwen3ForCausalLM(config).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.tensor([[5, 6, 7]])).logits[0, -1].double(), dim=-1)
    ordered = torch.sort(probabilities, descending=True)
    nucleus = set(ordered.indices[: int((ordered.values.cumsum(0) < 0.05).sum()) + 1].tolist())
    assert 2 <= len(nucleus) < 20  # a test of top_p, not of the argmax
    greedy = engine.generate([[5, 6, 7]] * 64, SamplingParams(0.01, 1.0, 0, 1), seed=0)
    assert {r.response_ids[0] for r in greedy} == {int(probabilities.argmax())}
    top_p = engine.generate([[5, 6, 7]] * 256, SamplingParams(1.0, 0.05, 0, 1), seed=0)
    assert {r.response_ids[0] for r in top_p} <= nucleus and len({r.response_ids[0] for r in top_p}) > 1


def test_sglang_requests_carry_the_sampling_settings():
    from opsdc_megatron.rollout.sglang.client import GenerateRequest, generate_payload

    payload = generate_payload(GenerateRequest("r", [5, 6], SamplingParams(0.6, 0.95, 20, 64), (1, 2), seed=7))
    assert payload["sampling_params"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64,
                                          "stop_token_ids": [1, 2], "sampling_seed": 7}
    assert generate_payload(GenerateRequest("r", [5], SamplingParams(top_k=0), (1,), seed=0))["sampling_params"]["top_k"] == -1  # SGLang's "off"


def test_an_sglang_response_cut_short_of_the_budget_is_an_error():
    """SGLang lowers max_new_tokens to what its KV cache and context leave (only a start-up warning in its log)
    and answers finish_reason 'length': the run would train on, or evaluate, shorter responses than configured.
    A response that reaches the model's context ends 2 tokens short (SGLang's context arithmetic): accepted."""
    from opsdc_megatron.rollout.sglang.client import GenerateRequest, ServerRejected, parse_generate_response

    request = GenerateRequest("r", [5, 6], SamplingParams(max_new_tokens=64), (1,), seed=0, return_logprob=False)
    answer = lambda ids, reason: {"output_ids": ids, "meta_info": {"finish_reason": {"type": reason}, "weight_version": "3"}}  # noqa: E731
    assert parse_generate_response(request, answer(list(range(64)), "length"), "http://s").finish_reason == "length"
    assert parse_generate_response(request, answer([7, 1], "stop"), "http://s").output_ids == [7, 1]
    assert len(parse_generate_response(request, answer(list(range(62)), "length"), "http://s").output_ids) == 62  # at the context's end
    with pytest.raises(ServerRejected, match="ended the response at 10 tokens .* short of max_new_tokens = 64 after a 2-token prompt"):
        parse_generate_response(request, answer(list(range(10)), "length"), "http://s")


def test_stop_tokens_and_lengths(tiny):
    stop = list(range(20))
    engine = engine_for(tiny, stop)
    rollouts = generate_across_ranks(engine, [[5, 6], [7, 8, 9], [10]] * 5, SamplingParams(max_new_tokens=6), seed=1, block_prompts=4)
    assert [r.prompt_index for r in rollouts] == list(range(15))
    for r in rollouts:
        assert r.weight_version == 3
        assert all(t >= 20 for t in r.response_ids[:-1])
        if r.finish_reason == "stop":
            assert r.response_ids[-1] in stop
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 6 and r.response_ids[-1] >= 20
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}


def test_same_seed_same_rollouts_and_weight_push_changes_them(tiny):
    engine = engine_for(tiny, stop=[1])
    sampling = SamplingParams(max_new_tokens=8)
    first = engine.generate([[5, 6, 7]] * 8, sampling, seed=4)
    assert engine.generate([[5, 6, 7]] * 8, sampling, seed=4) == first
    # train.seed 20260303 at step 1: derived seeds past int64, torch.manual_seed's range; each still
    # reproduces its rollouts, and the next block's seed gives others
    big = (20_260_303 * 1_000_003 + 1) * 1_000_003
    assert big >= 2**63
    at_big = engine.generate([[5, 6, 7]] * 8, sampling, seed=big)
    assert engine.generate([[5, 6, 7]] * 8, sampling, seed=big) == at_big
    assert [r.response_ids for r in engine.generate([[5, 6, 7]] * 8, sampling, seed=big + 1)] != [r.response_ids for r in at_big]
    config, weights = tiny
    shifted = {k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()}
    engine.update_weights(shifted, version=4)
    second = engine.generate([[5, 6, 7]] * 8, sampling, seed=4)
    assert [r.response_ids for r in second] != [r.response_ids for r in first]
    assert all(r.weight_version == 4 for r in second)


def test_push_with_wrong_names_is_refused(tiny):
    engine = engine_for(tiny, stop=[1])
    config, weights = tiny
    with pytest.raises(KeyError, match="model.norm.weight"):
        engine.update_weights({k: v for k, v in weights.items() if k != "model.norm.weight"}, version=5)


def test_sampling_leaves_the_trainers_random_stream_alone(tiny):
    """A rollout's seed is set in a forked generator state: the process's stream goes on as if no rollout ran."""
    engine = engine_for(tiny, stop=[1])
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    engine.generate([[5, 6, 7]] * 2, SamplingParams(max_new_tokens=3), seed=4)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("case", ["error", "stop"])
def test_rollouts_that_fail_on_one_rank_raise_on_every_rank(case):
    """Rank 1's rollouts fail (a server gone) or stop (a stop request) at its first block, while rank 0, done
    with its own, waits for rank 1's in the gather. Every rank raises the same error, naming rank 1's: before,
    rank 1 raised alone and rank 0 waited in the gather until the process group's timeout."""
    from tests.launch import torchrun

    output = torchrun("rollout_failure_worker.py", 2, case, timeout_s=300)
    if case == "error":
        expected = "RolloutEngineError: rank 1: ConnectionError: server gone"
        assert f"RANK0={expected} (cause: NoneType)" in output and f"RANK1={expected} (cause: ConnectionError)" in output, output[-3000:]
    else:
        expected = "RolloutInterrupted: rank 1: RolloutInterrupted: a stop was requested before block 2 of 4"
        assert f"RANK0={expected} (cause: NoneType)" in output and f"RANK1={expected} (cause: RolloutInterrupted)" in output, output[-3000:]
