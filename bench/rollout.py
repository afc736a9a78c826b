"""Rollout speed of SGLang against the in-process transformers engine, and weight-push cost per transport.

Both in one run on the same machine (ratios, not absolute numbers, are what transfer):

1. tokens/s: the toy base model (`opsdc demo`'s), the same toy prompts and sampling (temperature 1,
   top-p 1, no top-k, `--max-new-tokens`), through `HFRolloutEngine` in blocks of `--block` prompts
   (as the training loop calls it) and through one SGLang server with `--block` requests in flight.
   Response tokens over wall time, best of `--reps` after one untimed warm-up batch.
2. weight push: a random Qwen3 of `--push-hidden` x `--push-layers` (fp32, so the size in GB is
   meaningful; the toy model is 3 MB and only measures per-request overhead) is served, and its
   state dict is pushed by each transport (tensor = shared memory, distributed = gloo broadcast,
   disk = safetensors + reload), `--reps` times; seconds per GB pushed, best of the repetitions.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/rollout.py [--cache .cache] [--out runs/bench_rollout.json]
(the servers run with OMP_NUM_THREADS=1 on CPU; give the in-process engine the same). Needs .venv-sglang
(make env-sglang). Starts at most one server at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.prompts import encode_prompt
from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.rollout.hf_engine import HFRolloutEngine
from opsdc_megatron.rollout.sglang.engine import SGLangRolloutEngine
from opsdc_megatron.rollout.sglang.client import post_json
from opsdc_megatron.rollout.sglang.launcher import ServerFleet, cpu_settings
from opsdc_megatron.toy.base_model import ensure_base_model
from opsdc_megatron.toy.task import toy_prompts
from opsdc_megatron.weight_push.buckets import tensor_bytes
from opsdc_megatron.weight_push.sglang_transports import DiskTransport, DistributedTransport, TensorTransport


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def best_seconds(run, reps: int) -> float:
    """Best wall time of `reps` runs after one untimed warm-up."""
    run()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def fastest_generation(generate, reps: int, before_each=None) -> tuple[float, int]:
    """(seconds, response tokens) of the run with the most tokens per second of `reps` after one
    untimed warm-up. Both numbers come from the same run: SGLang on CPU does not reproduce its samples
    from the seed, so runs differ in length. `before_each` runs untimed before every run."""
    generate()
    best = None
    for _ in range(reps):
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        tokens = sum(len(r.response_ids) for r in generate())
        seconds = time.perf_counter() - started
        if best is None or tokens / seconds > best[1] / best[0]:
            best = (seconds, tokens)
    return best


def rollout_speed(model_dir: Path, prompts: int, block: int, max_new_tokens: int, reps: int, log_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [encode_prompt(tokenizer, r.prompt) for r in toy_prompts(5, prompts, "heldout")]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    results = {}

    hf = HFRolloutEngine.from_pretrained(str(model_dir))

    def hf_batch():
        return [r for start in range(0, prompts, block) for r in hf.generate(prompt_ids[start : start + block], sampling, seed=start)]

    seconds, tokens = fastest_generation(hf_batch, reps)
    results["hf_in_process"] = {"seconds": seconds, "response_tokens": tokens, "tokens_per_s": tokens / seconds}

    settings = cpu_settings(str(model_dir), base_port=free_port(), log_dir=str(log_dir), max_running_requests=block)
    with ServerFleet(settings, 1) as fleet:
        engine = SGLangRolloutEngine(fleet, TensorTransport(), [tokenizer.eos_token_id], hf.model.config.vocab_size, max_concurrent_requests=block)
        engine.update_weights(hf.model.state_dict(), version=0)
        # The same prompts every run: flush SGLang's prefix cache so no run reuses the last one's (HF has none).
        flush = lambda: [post_json(f"{url}/flush_cache", {}, timeout_s=60) for url in fleet.urls]  # noqa: E731
        seconds, tokens = fastest_generation(lambda: engine.generate(prompt_ids, sampling, seed=1), reps, before_each=flush)
        results["sglang_1_server"] = {"seconds": seconds, "response_tokens": tokens, "tokens_per_s": tokens / seconds}
    results["sglang_over_hf"] = results["sglang_1_server"]["tokens_per_s"] / results["hf_in_process"]["tokens_per_s"]
    return results


def push_cost(hidden: int, layers: int, reps: int, bucket_mib: int, work: Path) -> dict:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
        max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=1,
    )
    model_dir = work / "push_model"
    Qwen3ForCausalLM(config).float().save_pretrained(model_dir)
    state = {k: v.clone() for k, v in Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items()}
    gigabytes = sum(tensor_bytes(t) for t in state.values()) / 1e9
    results = {"model_gb": gigabytes, "parameters": sum(t.numel() for t in state.values()), "bucket_mib": bucket_mib}
    settings = cpu_settings(str(model_dir), base_port=free_port(), log_dir=str(work / "logs"), max_total_tokens=1024)
    bucket_bytes = bucket_mib * 1024**2
    with ServerFleet(settings, 1) as fleet:
        for name, transport in (
            ("tensor", TensorTransport(bucket_bytes)),
            ("distributed", DistributedTransport(bucket_bytes)),
            ("disk", DiskTransport(work / "pushed", model_dir)),
        ):
            engine = SGLangRolloutEngine(fleet, transport, [1], config.vocab_size)
            version = iter(range(1000))
            try:
                seconds = best_seconds(lambda: engine.update_weights(state, version=next(version)), reps)
            finally:
                transport.close()
            results[name] = {"seconds": seconds, "seconds_per_gb": seconds / gigabytes}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache", help="toy base model cache (opsdc demo --cache)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--block", type=int, default=16, help="prompts per HF generate call = SGLang requests in flight")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--push-hidden", type=int, default=1024)
    parser.add_argument("--push-layers", type=int, default=8)
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_rollout.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        work = Path(tmp)
        speed = rollout_speed(ensure_base_model(Path(args.cache)), args.prompts, args.block, args.max_new_tokens, args.reps, work / "logs")
        push = push_cost(args.push_hidden, args.push_layers, args.reps, args.bucket_mib, work)
    report = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rollout": speed, "weight_push": push,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
