"""The toy base model: a tiny Qwen3 trained from scratch on CPU to be verbose on plain prompts
and concise on instructed ones, the starting point OPSDC needs.

The training mix follows the prototype of FACTS section 4: 2/3 plain prompts (88% verbose,
12% concise answers), 1/3 instructed prompts (all concise). Because verbose answers carry slipped
re-checks, sampling at temperature 1 gives the plain prompt ~100 tokens at lower accuracy and the
instructed prompt ~25 tokens at higher accuracy; self-distillation should move the plain prompt to
the instructed behaviour. The architecture is Qwen3 with grouped-query attention (4 query heads,
2 KV heads, head_dim 32) and tied embeddings, so the Hugging Face <-> Megatron paths are exercised
on the same layout as the real models.

The output is a standard Hugging Face folder (config.json, model.safetensors in fp32,
generation_config.json, tokenizer files), written atomically. `ensure_base_model` caches it under a
hash of the recipe, so a changed recipe rebuilds instead of silently reusing a stale model.

CLI: python -m opsdc_megatron.toy.base_model --out DIR [--eval-n 200]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.eval.evaluate import evaluate_model
from opsdc_megatron.prompts import encode_prompt, user_message
from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.toy import task
from opsdc_megatron.toy import tokenizer as toy_tokenizer
from opsdc_megatron.toy.task import TOY_INSTRUCTION, concise_solution, sample_problems, toy_prompts, verbose_solution
from opsdc_megatron.toy.tokenizer import build_toy_tokenizer, toy_vocabulary

BUILD_INFO = "toy_build.json"
"""Recipe, hash, parameter count and build time, written next to the weights for traceability."""


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the built model (all of it goes into the cache key)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    vocab_multiple: int = 16
    """The config's vocab_size is the tokenizer size rounded up to this (as real Qwen3 pads its vocab)."""
    steps: int = 1200
    batch_size: int = 32
    bucket_batches: int = 8
    loss_normalization: str = "pool-mean-tokens"
    """Recorded in the cache key: see length_bucketed_batches."""
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    plain_fraction: float = 2 / 3
    plain_verbose_fraction: float = 0.88
    max_positions: int = 512


def recipe_hash(settings: BuildSettings, seed: int) -> str:
    """Short hash of the full recipe: settings, seed, and the source of the task, tokenizer and this
    builder, and of the prompt layout it trains on (any change to their texts, ranges, rates, split,
    prompt format or training code is a new model)."""
    sources = [Path(module.__file__).read_text(encoding="utf-8") for module in (task, toy_tokenizer, sys.modules[__name__])]
    sources += [inspect.getsource(function) for function in (encode_prompt, user_message)]
    recipe = {
        "settings": asdict(settings),
        "seed": seed,
        "sources": [hashlib.sha256(source.encode("utf-8")).hexdigest() for source in sources],
        "vocabulary": toy_vocabulary(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:10]


def make_config(settings: BuildSettings, tokenizer: PreTrainedTokenizerBase) -> Qwen3Config:
    """The Qwen3 config of the toy model (GQA, tied embeddings, vocab padded to `vocab_multiple`)."""
    vocab_size = math.ceil(len(tokenizer) / settings.vocab_multiple) * settings.vocab_multiple
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Sampling exactly as OPSDC rolls out: temperature 1, no top-k (HF's default 50 would hide tails), no top-p."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=256,
    )


def training_example(
    rng: random.Random, tokenizer: PreTrainedTokenizerBase, settings: BuildSettings
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one train-split problem; labels are -100 on the prompt."""
    problem = sample_problems(rng, 1, "train", unique=False)[0]
    if rng.random() < settings.plain_fraction:
        instruction = None
        verbose = rng.random() < settings.plain_verbose_fraction
        response = verbose_solution(problem, rng) if verbose else concise_solution(problem)
    else:
        instruction, response = TOY_INSTRUCTION, concise_solution(problem)
    prompt_ids = encode_prompt(tokenizer, problem.question, instruction)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (training needs no left padding: every position is scored in one pass)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_bucketed_batches(
    rng: random.Random, tokenizer: PreTrainedTokenizerBase, settings: BuildSettings
) -> list[dict[str, torch.Tensor]]:
    """`bucket_batches` batches cut from a length-sorted pool, in random order: about half the padding
    (verbose and concise answers differ 4x in length), hence about half the CPU time per step.

    Every batch divides its summed token loss by the pool's mean tokens per batch, not by its own
    count: a per-batch mean would weight a short (concise) batch's tokens ~5x more than a verbose
    batch's and skew the learned plain-prompt style mix toward concise (measured: 63% verbose
    instead of 88%).
    """
    pool = [training_example(rng, tokenizer, settings) for _ in range(settings.bucket_batches * settings.batch_size)]
    pool.sort(key=lambda example: len(example[0]))
    size = settings.batch_size
    batches = [collate(pool[i : i + size], tokenizer.pad_token_id) for i in range(0, len(pool), size)]
    # labels are shifted inside the model: the first label of each row is never a target
    scored = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    for batch in batches:
        batch["num_items_in_batch"] = torch.tensor(scored / len(batches))
    rng.shuffle(batches)
    return batches


def _lr_factor(step: int, settings: BuildSettings) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio`."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an existing `out_dir` is replaced only after the new one is complete."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_base_model(
    out_dir: Path,
    seed: int = 0,
    steps: int | None = None,
    settings: BuildSettings | None = None,
    progress: bool = True,
) -> Path:
    """Train the toy base model and write it to `out_dir` atomically; `steps` overrides the recipe (tests)."""
    settings = settings or BuildSettings()
    if steps is not None:
        settings = replace(settings, steps=steps, warmup_steps=min(settings.warmup_steps, max(1, steps // 10)))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    tokenizer = build_toy_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(make_config(settings, tokenizer)).float()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    rng = random.Random(f"toy-base:{seed}")

    bar = tqdm(range(settings.steps), desc="toy base model", disable=not progress, dynamic_ncols=True)
    running = None
    batches: list[dict[str, torch.Tensor]] = []
    for _ in bar:
        if not batches:
            batches = length_bucketed_batches(rng, tokenizer, settings)
        loss = model(**batches.pop()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "recipe_hash": recipe_hash(settings, seed),
        "seed": seed,
        "settings": asdict(settings),
        "task_version": task.TASK_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": running,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _replace_dir(tmp, out_dir)
    return out_dir


def base_model_folder(cache_dir: Path, seed: int = 0, settings: BuildSettings | None = None) -> Path:
    """Where the base model for this recipe is cached: cache_dir/toy_base-<hash of the settings and the toy's code>."""
    return Path(cache_dir) / f"toy_base-{recipe_hash(settings or BuildSettings(), seed)}"


def ensure_base_model(cache_dir: Path, seed: int = 0, settings: BuildSettings | None = None) -> Path:
    """The cached base model for this recipe (`base_model_folder`), built on first use."""
    out_dir = base_model_folder(cache_dir, seed, settings)
    if (out_dir / BUILD_INFO).is_file():
        return out_dir
    return build_base_model(out_dir, seed=seed, settings=settings or BuildSettings())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out prompts to sample afterwards (0: skip)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate an existing --out folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.eval_only:
        build_base_model(args.out, seed=args.seed, steps=args.steps)
        print(json.dumps(json.loads((args.out / BUILD_INFO).read_text()), indent=2))
    if args.eval_n > 0:
        records = toy_prompts(seed=args.seed + 1000, count=args.eval_n, split="heldout")
        results = evaluate_model(args.out, records, {"plain": None, "instructed": TOY_INSTRUCTION}, SamplingParams(max_new_tokens=256), args.seed)
        print(json.dumps({kind: result.as_dict() for kind, result in results.items()}, indent=2))


if __name__ == "__main__":
    main()
