"""A slice of Qwen3-8B (a few decoder layers + the 151,936-token output layer), forward+backward with a
cross-entropy loss, in three stacks measured in the same run:

* ``megatron_local``: megatron-core GPTModel with its local (non-Transformer-Engine) spec, as
  megatron-core ships it (unfused ``DotProductAttention``, no fusions that need apex or TE);
* ``megatron_sdpa``: the same model with ``opsdc_megatron.models.sdpa_attention.SDPAttention`` as the
  attention core (torch's fused SDPA kernels) and megatron's torch.compile'd SwiGLU and
  cross-entropy fusions (``bias_activation_fusion``, ``cross_entropy_loss_fusion``);
* ``hf``: Hugging Face transformers' Qwen3ForCausalLM with ``attn_implementation="sdpa"``, the stack
  the paper's own code trains on.

Same shapes, bf16 weights, random tokens, one sequence of ``--seq`` tokens. Prints the best time of
``--reps`` after warm-up steps, model TFLOP/s (6 x matmul parameters x tokens + causal attention),
and peak allocated memory (weights and gradients included), each also as a ratio to ``hf``.

Usage (GPU): ``python bench/layer_slice.py [--layers 4] [--seq 4096] [--reps 5]``. On CPU it runs the
same code at a toy size (``--hidden 256 --seq 256``) to check that it runs, not to time anything.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STACKS = ("megatron_local", "megatron_sdpa", "hf")


def qwen3_config(layers: int, hidden: int, vocab: int):
    from transformers import Qwen3Config

    heads = hidden // 128
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=128,
        tie_word_embeddings=False, rope_theta=1_000_000.0, max_position_embeddings=40960,
        torch_dtype="bfloat16",
    )


def build(stack: str, hf_config, device: str) -> torch.nn.Module:
    if stack == "hf":
        from transformers import Qwen3ForCausalLM

        hf_config._attn_implementation = "sdpa"
        return Qwen3ForCausalLM(hf_config).to(device=device, dtype=torch.bfloat16)
    from megatron.core.models.gpt import GPTModel

    from opsdc_megatron.models.hf_config import rope_theta
    from opsdc_megatron.models.qwen3.model import padded_vocab_size, transformer_config_from_hf
    from opsdc_megatron.models.layer_spec import gpt_layer_spec

    config = transformer_config_from_hf(hf_config, 1, 1, params_dtype=torch.bfloat16)
    if stack == "megatron_sdpa":
        config.bias_activation_fusion = True
        config.cross_entropy_loss_fusion = True
    model = GPTModel(
        config=config, transformer_layer_spec=gpt_layer_spec("sdpa" if stack == "megatron_sdpa" else "local"),
        vocab_size=padded_vocab_size(hf_config.vocab_size, 1), max_sequence_length=hf_config.max_position_embeddings,
        parallel_output=True, share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
    )
    return model.to(device=device, dtype=torch.bfloat16)  # norms too, as megatron's Float16Module does


def step(stack: str, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    if stack == "hf":
        model(input_ids=tokens, labels=tokens).loss.backward()
    else:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        model(tokens, positions, attention_mask=None, labels=labels).float().mean().backward()
    for param in model.parameters():
        param.grad = None


def matmul_flop(hf_config, seq: int) -> float:
    h, ffn, layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
    q = hf_config.num_attention_heads * hf_config.head_dim
    kv = hf_config.num_key_value_heads * hf_config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * ffn
    params = layers * per_layer + hf_config.vocab_size * h
    causal_attention = 6 * layers * seq * seq * q  # QK^T and PV, forward + backward, half the square
    return 6 * params * seq + causal_attention


def measure(stack: str, hf_config, seq: int, reps: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(stack, hf_config, device)
    tokens = torch.randint(0, hf_config.vocab_size, (1, seq), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    for _ in range(2):
        step(stack, model, tokens, labels)  # warm-up: compilation, autotuning, allocator
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(stack, model, tokens, labels)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            step(stack, model, tokens, labels)
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"time_s": min(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from opsdc_megatron.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=0)
    try:
        hf_config = qwen3_config(args.layers, args.hidden, args.vocab)
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"{args.layers} Qwen3 layers (hidden {args.hidden}) + vocab {args.vocab}, seq {args.seq}, bf16, {name}, torch {torch.__version__}")
        flop = matmul_flop(hf_config, args.seq)
        results = {stack: measure(stack, hf_config, args.seq, args.reps, device) for stack in args.stacks}
        base = results.get("hf")
        print("| stack | time | TFLOP/s | peak memory | time / hf | memory / hf |")
        print("|---|---|---|---|---|---|")
        for stack, r in results.items():
            ratios = f"{r['time_s'] / base['time_s']:.2f} | {r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}" if base else "- | -"
            print(f"| {stack} | {r['time_s'] * 1e3:.1f} ms | {flop / r['time_s'] / 1e12:.0f} | {r['peak_bytes'] / 2**30:.1f} GiB | {ratios} |", flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
