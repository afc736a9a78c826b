"""`opsdc convert` both ways on a synthetic checkpoint with Qwen3-14B layer shapes: GB/s and peak memory.

A HF folder with Qwen3-14B's shapes (hidden 5120, MLP 17408, 40 query / 8 KV heads of 128,
vocabulary 151936, untied embeddings) but only ``--layers`` decoder layers of random bf16 weights
is written tensor by tensor (one safetensors file per layer). Then, each in its own process tree,
exactly as a user runs them:

1. ``opsdc convert hf-to-megatron --tp 1`` (one megatron rank; streamed: each tensor read when written);
2. ``opsdc convert megatron-to-hf --max-shard-gb S`` (streamed: slices read one output file at a time);
3. a process that only imports what the converters import (the baseline).

Peak memory is the kernel's resident-set high-water mark (``ru_maxrss``) of the largest process
of each tree (for hf-to-megatron the torchrun worker), with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that freed tensors leave the resident set. It is reported minus the import baseline, in units of
the largest tensor (the 151936 x 5120 embedding, 1.56 GB in bf16). Throughput is weight bytes over
the command's wall time, process start-up and imports included. Results are also checked: the
exported tensors must equal the synthetic ones bit for bit.

Usage: ``python bench/convert.py [--layers 2] [--max-shard-gb 2] [--work DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3Config

from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

QWEN3_14B = dict(
    vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
)
IMPORTS = "import opsdc_megatron.convert.hf_to_megatron, opsdc_megatron.convert.megatron_to_hf, opsdc_megatron.parallel, opsdc_megatron.cli"


def write_synthetic_hf(folder: Path, layers: int) -> tuple[int, int]:
    """(total weight bytes, largest tensor bytes) of a Qwen3-14B-shaped folder written file by file."""
    config = Qwen3Config(**QWEN3_14B, num_hidden_layers=layers, architectures=["Qwen3ForCausalLM"], dtype="bfloat16")
    folder.mkdir(parents=True)
    config.to_json_file(folder / "config.json")
    build_toy_tokenizer().save_pretrained(folder)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    files: list[tuple[str, dict[str, tuple[int, ...]]]] = [("model-embed.safetensors", {"model.embed_tokens.weight": (v, h)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        files.append((f"model-layer{i:03d}.safetensors", {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q), p + "self_attn.q_norm.weight": (config.head_dim,),
            p + "self_attn.k_norm.weight": (config.head_dim,), p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        }))
    files.append(("model-head.safetensors", {"model.norm.weight": (h,), "lm_head.weight": (v, h)}))
    generator = torch.Generator().manual_seed(0)
    weight_map, total, largest = {}, 0, 0
    for file, shapes in files:
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).bfloat16() for name, shape in shapes.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * 2
            largest = max(largest, tensor.numel() * 2)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, largest


def measured(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the largest process of the tree) of `command` in a fresh process."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", probe, *command], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    seconds, max_rss_kib = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(max_rss_kib) * 1024


def check_identical(source: Path, exported: Path) -> None:
    for folder in (source, exported):
        assert (folder / "model.safetensors.index.json").is_file()
    source_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    exported_map = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert source_map.keys() == exported_map.keys(), sorted(source_map.keys() ^ exported_map.keys())
    for name in source_map:
        with safe_open(source / source_map[name], "pt") as a, safe_open(exported / exported_map[name], "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-shard-gb", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="opsdc-bench-convert-"))
    opsdc = str(Path(sys.executable).with_name("opsdc"))
    try:
        hf, ckpt, exported = work / "hf", work / "megatron", work / "exported"
        total, largest = write_synthetic_hf(hf, args.layers)
        _, baseline = measured([sys.executable, "-c", IMPORTS])
        rows = []
        for label, command in (
            ("hf-to-megatron (TP=1)", [opsdc, "convert", "hf-to-megatron", "--hf", str(hf), "--out", str(ckpt)]),
            (f"megatron-to-hf ({args.max_shard_gb:g} GB shards)", [opsdc, "convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(exported), "--max-shard-gb", str(args.max_shard_gb)]),
        ):
            seconds, peak = measured(command)
            rows.append((label, seconds, peak))
        check_identical(hf, exported)
        print(f"Qwen3-14B shapes, {args.layers} layers, bf16: {total / 1e9:.2f} GB of weights, largest tensor {largest / 1e9:.2f} GB; "
              f"import baseline RSS {baseline / 1e9:.2f} GB; round trip bitwise identical")
        print("| direction | wall s | GB/s | peak RSS GB | (peak - baseline) / largest tensor |")
        print("|---|---|---|---|---|")
        for label, seconds, peak in rows:
            print(f"| {label} | {seconds:.1f} | {total / 1e9 / seconds:.3f} | {peak / 1e9:.2f} | {(peak - baseline) / largest:.2f} |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
