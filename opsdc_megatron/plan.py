"""`opsdc plan`: choose the trainer's parallel layout for a model and a GPU count, with a per-GPU memory
estimate, before anyone waits in a queue.

The estimate is a model, not a measurement (write down what it assumes; the recipes' comments and
bench/ measurements check it). Per GPU, on the pipeline stage that holds the most:

* weights: bf16 student parameters of the stage, ``2 P / (TP PP)`` plus the embedding and/or output
  layer (``V H / TP`` each) on the first/last stage;
* teacher: the same again in bf16; with ``--teacher-offload`` (``distill.teacher_offload``, weights in
  host memory streamed layer by layer) two streamed units, the one computing and the next arriving,
  each the larger of a layer (``P_layer / TP``) and the embedding or output layer (``V H / TP``);
* gradients: megatron DDP's fp32 gradient buffer, 4 bytes per stage parameter;
* optimizer: fp32 master weights and Adam's two moments, 12 bytes per stage parameter, sharded over
  DP by megatron's distributed optimizer;
* activations: per layer and micro-batch ``34 s b H / TP`` bytes with sequence parallelism
  (``parallel.sequence_parallel``, on at TP > 1 unless ``--no-sequence-parallel``), else
  ``s b H (10 + 24 / TP)`` (Korthikanti et al. 2022, with flash/SDPA attention so no ``s x s``
  scores), for the layers of one stage times the micro-batches 1F1B keeps in flight there
  (``min(PP, micro-batches)``); with full activation recomputation only each layer's bf16 input is
  kept (``2 s b H``, / TP with sequence parallelism) plus one layer's activations while it is recomputed;
* logits on the last stage: student and teacher logits and their gradient, ``3 s b V / TP`` bf16,
  plus the KL's fp32 blocks (0.2x); with the fused output layer 1/8 of one logits tensor plus the
  ``[s b, H]`` bf16 hidden-state gradient it computes in forward (the weight's goes into the fp32
  gradients counted below) and the bf16 placeholder weight gradient (``V H / TP``) its backward hands
  megatron DDP's hook;
* a fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.

Choice: among layouts that fit (TP within a node and dividing the attention heads and KV groups, PP
dividing the layers, DP dividing the batch), the smallest model-parallel size TP x PP (the most data
parallelism), preferring tensor over pipeline parallelism at equal size (no pipeline bubble). Full
activation recomputation (about a third more compute) is chosen only when nothing fits without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 2**30
H100_80GB_GIB = 81559 / 1024
"""What an H100 80GB HBM3 reports (81,559 MiB)."""
RESERVE_GIB = 6.0


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf_config(cls, path: Path) -> "ModelShape":
        """From a Hugging Face config.json (a file or the model folder holding it)."""
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"--model: {path} is not a config.json or a folder holding one")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}: not valid JSON: {error}") from None
        missing = [key for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size") if key not in config]
        if missing:
            raise ValueError(f"{file}: missing fields {missing}")
        from opsdc_megatron.models.registry import architecture_of  # here: it imports megatron (~3 s)

        try:  # a model the trainer cannot build (a mixture of experts, say) would get a dense model's estimate
            architecture_of(config)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None
        heads = config["num_attention_heads"]
        return cls(
            layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            ffn=config["intermediate_size"], vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass(frozen=True)
class Workload:
    seq_tokens: int
    """Tokens per sequence (prompt + response)."""
    global_batch_prompts: int = 32
    micro_batch_prompts: int = 2
    fused_output_layer: bool = True
    teacher_offload: bool = False
    recompute: bool = False
    """Full activation recomputation (megatron's recompute_granularity=full, uniform, 1 layer)."""
    sequence_parallel: bool = True
    """parallel.sequence_parallel wherever TP > 1 (it needs no more memory or communication volume)."""


@dataclass(frozen=True)
class Plan:
    tp: int
    pp: int
    dp: int
    micro_batches_per_rank: int
    recompute: bool
    memory_gib: dict[str, float]

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())


def estimate(model: ModelShape, work: Workload, tp: int, pp: int, dp: int) -> Plan:
    """Per-GPU memory of the fullest pipeline stage, in GiB, by component."""
    embedding = model.vocab * model.hidden / tp
    ends = embedding * (1 if model.tied or pp > 1 else 2)  # embedding and output on one stage when PP = 1
    stage_params = model.layers * model.layer_params / (tp * pp) + ends
    micro_batches = work.global_batch_prompts // dp // work.micro_batch_prompts
    tokens = work.seq_tokens * work.micro_batch_prompts
    sequence_shards = tp if work.sequence_parallel else 1
    per_layer_activation = tokens * model.hidden * (10 / sequence_shards + 24 / tp)
    in_flight_layers = (model.layers / pp) * min(pp, micro_batches)
    if work.recompute:
        activations = 2 * tokens * model.hidden / sequence_shards * in_flight_layers + per_layer_activation
    else:
        activations = per_layer_activation * in_flight_layers
    logits_shard = tokens * model.vocab / tp * 2
    if work.fused_output_layer:
        logits = logits_shard / 8 + tokens * model.hidden * 2 + 2 * embedding
    else:
        logits = 3.2 * logits_shard
    memory = {
        "weights": 2 * stage_params,
        "teacher": 2 * 2 * max(model.layer_params / tp, embedding) if work.teacher_offload else 2 * stage_params,
        "gradients": 4 * stage_params,
        "optimizer": 12 * stage_params / dp,
        "activations": activations,
        "logits": logits,
    }
    memory = {key: value / GIB for key, value in memory.items()}
    memory["reserve"] = RESERVE_GIB
    return Plan(tp, pp, dp, micro_batches, work.recompute, memory)


def candidates(model: ModelShape, work: Workload, gpus: int, gpus_per_node: int) -> list[Plan]:
    """Every layout the model, the GPU count and the batch allow, smallest model-parallel first."""
    plans = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or (gpus > gpus_per_node and gpus_per_node % tp) or model.heads % tp or model.kv_heads % tp or model.ffn % tp:
            continue  # a tensor-parallel group stays within one node
        for pp in range(1, model.layers + 1):
            if model.layers % pp or gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if work.global_batch_prompts % dp or (work.global_batch_prompts // dp) % work.micro_batch_prompts:
                continue
            plans.append(estimate(model, work, tp, pp, dp))
    return sorted(plans, key=lambda plan: (plan.tp * plan.pp, plan.pp))


def choose(model: ModelShape, work: Workload, gpus: int, gpus_per_node: int, gpu_memory_gib: float) -> tuple[Plan, list[Plan]]:
    """The chosen plan and all candidates; raises ValueError saying why nothing fits."""
    for flag, value in (("--gpus", gpus), ("--gpus-per-node", gpus_per_node), ("--seq", work.seq_tokens),
                        ("--global-batch-prompts", work.global_batch_prompts), ("--micro-batch-prompts", work.micro_batch_prompts)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}")
    plans = candidates(model, work, gpus, gpus_per_node)
    if not plans:
        raise ValueError(
            f"no layout of {gpus} GPUs divides this model and batch: heads {model.heads}, KV groups {model.kv_heads}, "
            f"layers {model.layers}, global_batch_prompts {work.global_batch_prompts}, micro_batch_prompts {work.micro_batch_prompts}"
        )
    fitting = [plan for plan in plans if plan.total_gib <= gpu_memory_gib]
    if not fitting and not work.recompute:
        recomputed = candidates(model, replace(work, recompute=True), gpus, gpus_per_node)
        fitting = [plan for plan in recomputed if plan.total_gib <= gpu_memory_gib]
        plans = plans + recomputed
    if not fitting:
        smallest = min(plans, key=lambda plan: plan.total_gib)
        parts = ", ".join(f"{key} {value:.1f}" for key, value in smallest.memory_gib.items())
        raise ValueError(
            f"no layout fits {gpu_memory_gib:.1f} GiB per GPU: the leanest, TP={smallest.tp} PP={smallest.pp} DP={smallest.dp}"
            f"{' with full recompute' if smallest.recompute else ''}, needs {smallest.total_gib:.1f} GiB ({parts}); "
            f"use more GPUs, a shorter --seq, --teacher-offload or a smaller micro-batch"
        )
    return fitting[0], plans


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="choose TP/PP/DP for a model and GPU count, with a per-GPU memory estimate")
    plan.add_argument("--model", required=True, type=Path, help="Hugging Face config.json (or the model folder)")
    plan.add_argument("--gpus", required=True, type=int, help="trainer GPUs in all (rollout servers not counted)")
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--seq", required=True, type=int, help="tokens per sequence: prompt + response")
    plan.add_argument("--gpu-memory-gib", type=float, default=H100_80GB_GIB, help="per GPU (default: H100 80GB)")
    plan.add_argument("--global-batch-prompts", type=int, default=32)
    plan.add_argument("--micro-batch-prompts", type=int, default=2)
    plan.add_argument("--unfused-output-layer", action="store_true", help="estimate without distill.fused_output_layer")
    plan.add_argument("--teacher-offload", action="store_true", help="distill.teacher_offload: teacher weights in CPU memory, streamed to the GPU layer by layer")
    plan.add_argument("--no-sequence-parallel", action="store_true", help="estimate without parallel.sequence_parallel")
    plan.set_defaults(handler=plan_command)


def plan_command(args: argparse.Namespace) -> None:
    try:
        model = ModelShape.from_hf_config(args.model)
        work = Workload(args.seq, args.global_batch_prompts, args.micro_batch_prompts, not args.unfused_output_layer, args.teacher_offload,
                        sequence_parallel=not args.no_sequence_parallel)
        chosen, plans = choose(model, work, args.gpus, args.gpus_per_node, args.gpu_memory_gib)
    except (ValueError, FileNotFoundError) as error:
        print(f"opsdc plan: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.model}: {model.params / 1e9:.2f}B parameters, {model.layers} layers; {args.gpus} GPUs "
          f"({args.gpus_per_node} per node, {args.gpu_memory_gib:.1f} GiB each); {args.seq} tokens per sequence")
    keys = list(chosen.memory_gib)
    print("| TP | PP | DP | micro-batches / rank | recompute | " + " | ".join(keys) + " | total GiB | fits |")
    print("|" + "---|" * (7 + len(keys)))
    for plan in plans:
        mark = "**chosen**" if plan is chosen else ("yes" if plan.total_gib <= args.gpu_memory_gib else "no")
        values = " | ".join(f"{plan.memory_gib[key]:.1f}" for key in keys)
        recompute = "full" if plan.recompute else "none"
        print(f"| {plan.tp} | {plan.pp} | {plan.dp} | {plan.micro_batches_per_rank} | {recompute} | {values} | {plan.total_gib:.1f} | {mark} |")
    # Every setting the estimate assumes: a recipe without one of them needs more memory than estimated.
    print(f"recipe: parallel.tensor_parallel_size={chosen.tp} parallel.pipeline_parallel_size={chosen.pp} "
          f"parallel.data_parallel_size={chosen.dp} parallel.distributed_optimizer=true "
          f"parallel.sequence_parallel={str(work.sequence_parallel and chosen.tp > 1).lower()} "
          f"model.activation_recompute={'full' if chosen.recompute else 'none'} "
          f"distill.fused_output_layer={str(work.fused_output_layer).lower()} distill.teacher_offload={str(work.teacher_offload).lower()} "
          f"train.global_batch_prompts={work.global_batch_prompts} train.micro_batch_prompts={work.micro_batch_prompts}")
