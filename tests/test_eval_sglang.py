"""`opsdc eval --engine sglang`: a real SGLang server (CPU) started on the toy model for the command and stopped after it.

One server start for the module (~30-60 s on the shared 2-core machine). At temperature 0 both engines
decode greedily in fp32, and SGLang's CPU path gives the same tokens as transformers (FACTS section 2),
so the report must equal the hf engine's, response for response. Sampling at temperature > 0 is not
compared: SGLang's CPU server does not honour per-request seeds (no deterministic inference on its
torch-native attention), so its samples differ from transformers' draws by design.
Needs .venv-sglang (make env-sglang).
"""

import json
import socket
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.cli import main
from opsdc_megatron.prompts import write_prompts
from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON
from opsdc_megatron.toy.task import toy_prompts
from opsdc_megatron.toy.tokenizer import build_toy_tokenizer
from tests.launch import free_port

pytestmark = [
    pytest.mark.eval,
    pytest.mark.sglang,
    pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`"),
]

MAX_TOKENS = 24


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def read(out: Path, instruction: str) -> tuple[dict, list[dict]]:
    [summary] = out.glob(f"*.{instruction}.json")
    responses = summary.with_name(summary.name.removesuffix(".json") + ".responses.jsonl")
    return json.loads(summary.read_text()), [json.loads(line) for line in responses.read_text().splitlines()]


def random_toy_model(folder: Path) -> Path:
    """A tiny random fp32 Qwen3 with the toy tokenizer whose greedy responses differ per prompt and per position.

    transformers' initialisation (std 0.02), like a briefly trained toy model, answers every prompt with
    one repeated token, which would compare nothing: weights std 0.15, norms in [0.5, 1.5], and the
    special tokens' (tied) embedding rows zero, so that greedy decoding runs the whole budget on words.
    """
    tokenizer = build_toy_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.15)
        model.model.embed_tokens.weight[tokenizer.all_special_ids] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """A tiny model evaluated greedily by both engines: (sglang out, hf out, port)."""
    root = tmp_path_factory.mktemp("eval_sglang")
    model = random_toy_model(root / "model")
    write_prompts(root / "test.jsonl", toy_prompts(3, 8, "heldout"))
    common = ["--model", str(model), "--data", str(root / "test.jsonl"), "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
              "--instruction", "both", "--instruction-text", "be concise .", "--samples", "2", "--batch-prompts", "8"]
    port = free_port()
    main(["eval", *common, "--engine", "sglang", "--sglang-base-port", str(port), "--out", str(root / "sglang")])
    main(["eval", *common, "--engine", "hf", "--out", str(root / "hf")])
    return root / "sglang", root / "hf", port


def test_report_is_well_formed_and_the_server_is_stopped(greedy):
    sglang_out, _, port = greedy
    for instruction in ("none", "concise"):
        summary, responses = read(sglang_out, instruction)
        result = summary["result"]
        assert summary["engine"] == "sglang" and summary["sampling"]["max_new_tokens"] == MAX_TOKENS
        assert (result["n"], result["samples_per_prompt"], len(responses)) == (8, 2, 16)
        assert sorted((r["prompt_index"], r["sample_index"]) for r in responses) == [(p, s) for p in range(8) for s in range(2)]
        assert all(1 <= r["response_tokens"] <= MAX_TOKENS for r in responses)
        assert all(r["response_tokens"] == MAX_TOKENS for r in responses if r["truncated"])
        assert result["accuracy"] == pytest.approx(sum(r["correct"] for r in responses) / 16)
        # greedy: both samples of a prompt are the same response; prompts get different ones
        by_prompt = {}
        for r in responses:
            by_prompt.setdefault(r["prompt_index"], set()).add(r["text"])
        assert all(len(texts) == 1 for texts in by_prompt.values())
        assert len(set.union(*by_prompt.values())) > 1
    assert "sglang.launch_server" in (sglang_out / "sglang_logs" / "server_0.log").read_text()
    assert not listening(port), "the SGLang server still listens after `opsdc eval` returned"


def test_greedy_responses_equal_the_hf_engine(greedy):
    sglang_out, hf_out, _ = greedy
    for instruction in ("none", "concise"):
        sglang_summary, sglang_responses = read(sglang_out, instruction)
        hf_summary, hf_responses = read(hf_out, instruction)
        key = lambda r: (r["prompt_index"], r["sample_index"])  # noqa: E731
        assert [(r["text"], r["response_tokens"], r["truncated"]) for r in sorted(sglang_responses, key=key)] == \
            [(r["text"], r["response_tokens"], r["truncated"]) for r in sorted(hf_responses, key=key)], instruction
        assert sglang_summary["result"] == hf_summary["result"]
    # the instruction changes the prompts, so the greedy responses differ
    assert read(sglang_out, "none")[1] != read(sglang_out, "concise")[1]

