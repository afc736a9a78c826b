"""The teacher's forward with its weights resident on the device and streamed from host memory
(distill.teacher_offload), measured in the same run: time and peak device memory, as ratios.

A Qwen3-8B-shaped chunk (``--layers`` decoder layers of hidden 4096, the 151,936-token embedding and
output layer, untied, bf16), one micro-batch of ``--micro-batch-prompts`` sequences of ``--seq``
tokens, forward under no_grad as `DistillStage` runs the teacher. ``resident``: the weights on the
device; ``streamed``: in pinned host memory, copied a unit ahead on a side stream
(distill/teacher_offload.py). Prints the best of ``--reps`` forward times after a warm-up, the peak
device memory during a forward (weights included), the device memory the teacher holds between
forwards, and the pinned host-to-device bandwidth measured here (what bounds streaming). The
streamed logits are checked equal to the resident ones.

Usage (GPU): ``python bench/teacher_offload.py [--layers 12] [--seq 4096] [--reps 3]``. Without a GPU
the compute device is the host: it runs a toy size and prints only the time ratio, which says
nothing about streaming over PCIe.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30


def parse_args() -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12 if on_gpu else 2)
    parser.add_argument("--hidden", type=int, default=4096 if on_gpu else 256)
    parser.add_argument("--vocab", type=int, default=151936 if on_gpu else 4096)
    parser.add_argument("--seq", type=int, default=4096 if on_gpu else 128)
    parser.add_argument("--micro-batch-prompts", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    return parser.parse_args()


def measure(model: torch.nn.Module, ids: torch.Tensor, reps: int) -> dict:
    """Best time of `reps` forwards after one warm-up; on a GPU the device memory held before the
    forward and the peak during it; the last logits, on the host."""
    on_gpu = torch.cuda.is_available()
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held_gib = torch.cuda.memory_allocated() / GIB
    best, logits = float("inf"), None
    with torch.no_grad():
        for rep in range(reps + 1):
            logits = None  # the previous call's logits are freed before the next call
            if on_gpu:
                torch.cuda.synchronize()
            started = time.perf_counter()
            logits = model(ids, positions, attention_mask=None)
            if on_gpu:
                torch.cuda.synchronize()
            if rep:
                best = min(best, time.perf_counter() - started)
    result = {"seconds": best, "logits": logits.cpu()}
    if on_gpu:
        result |= {"peak_gib": torch.cuda.max_memory_allocated() / GIB, "held_gib": held_gib}
    return result


def host_to_device_gib_per_s(size_bytes: int = GIB) -> float:
    host = torch.empty(size_bytes, dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda")
    device.copy_(host)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * size_bytes / (time.perf_counter() - started) / GIB


def main() -> None:
    args = parse_args()
    from transformers import Qwen3Config

    from opsdc_megatron.distill.teacher import TeacherSnapshot
    from opsdc_megatron.models.qwen3.model import build_gpt_model
    from opsdc_megatron.parallel import destroy_distributed, init_distributed

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    heads = args.hidden // 128 if on_gpu else 4
    hf_config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=args.hidden // heads,
        tie_word_embeddings=False, max_position_embeddings=max(4096, args.seq),
    )
    init_distributed(1, 1, seed=0)
    try:
        resident = build_gpt_model(hf_config, 1, params_dtype=torch.bfloat16).eval()
        model_gib = sum(p.numel() * p.element_size() for p in resident.parameters()) / GIB
        teacher = TeacherSnapshot(
            torch.nn.ModuleList([build_gpt_model(hf_config, 1, params_dtype=torch.bfloat16, empty_on_host=True)]), 0, offload=True
        )
        teacher.copy_from(torch.nn.ModuleList([resident]))
        ids = torch.randint(0, args.vocab, (args.micro_batch_prompts, args.seq), device=device, generator=torch.Generator(device).manual_seed(0))
        print(f"{torch.cuda.get_device_name() if on_gpu else 'CPU'}; torch {torch.__version__}; {args.layers} layers, hidden {args.hidden}, "
              f"vocab {args.vocab}: {model_gib:.2f} GiB bf16 weights; {args.micro_batch_prompts} x {args.seq} tokens")

        results = {"resident": measure(resident, ids, args.reps)}
        del resident  # the streamed run's device memory holds no resident copy
        results["streamed"] = measure(teacher.model[0], ids, args.reps)
        if not torch.equal(results["resident"]["logits"], results["streamed"]["logits"]):
            raise SystemExit("streamed logits differ from the resident teacher's")

        base = results["resident"]
        print("| teacher weights | forward ms | time ratio |" + (" peak GiB | peak ratio | held between forwards GiB |" if on_gpu else ""))
        print("|---|---|---|" + ("---|---|---|" if on_gpu else ""))
        for name, r in results.items():
            row = f"| {name} | {1000 * r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} |"
            if on_gpu:
                row += f" {r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f} | {r['held_gib']:.2f} |"
            print(row)
        if on_gpu:
            bandwidth = host_to_device_gib_per_s()
            print(f"pinned host-to-device copy: {bandwidth:.1f} GiB/s, so streaming {model_gib:.2f} GiB takes at least "
                  f"{1000 * model_gib / bandwidth:.0f} ms per forward")
        else:
            print("CPU: the compute device is the host, so only the time ratio means anything, and it says nothing about PCIe")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
