"""`opsdc plan`: choose TP x PP x DP and the micro-batch for a model and a GPU count, from a memory model.

Per GPU, for the busiest pipeline stage (OPSDC as this package trains it: bf16 weights, megatron DDP
with fp32 gradient buffers, Adam with fp32 main weights, a bf16 teacher copy of every student shard):

* student weights, 2 bytes/parameter; teacher copy, 2 bytes/parameter;
* gradients, 4 bytes/parameter (``grad_reduce_in_fp32``);
* optimizer, 12 bytes/parameter (fp32 main weight, Adam's two moments), divided by DP with the
  distributed optimizer;
* activations kept for backward, per layer and micro-batch, the Korthikanti et al. (2022,
  arXiv 2205.05198) count without recomputation or sequence parallelism,
  ``s b h (10 + 24/t)`` bytes plus the attention scores ``5 a s^2 b / t`` when the attention is not
  fused (megatron's local spec; flash/fused attention keeps none). The first 1F1B stage holds
  PP micro-batches of its layers/PP layers: all the layers' worth, whatever PP;
* logits on the last stage for one micro-batch (the teacher's never exceed one micro-batch,
  distill/stage.py): full bf16 student logits while they are cut to response positions, the cut
  copy, the teacher's, and the divergence's bf16 gradient: 8 bytes x b s V / t;
* a fixed reserve (CUDA context, NCCL and allocator fragmentation), 6 GiB by default.

A sequence is the student input plus the teacher input (the teacher runs beside the student, same
length plus the instruction): ``--seq`` is the longest student sequence and the teacher's is taken
as equally long. These are estimates to choose a layout, not guarantees; leave headroom.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
ARCHITECTURE = "Qwen3ForCausalLM"
_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


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
    def from_hf(cls, path: Path) -> ModelShape:
        """Read from a Qwen3 config.json (or its folder) without importing torch or megatron.

        Raises:
            ValueError: not a Qwen3 config, or a size is missing.
        """
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))
        if config.get("architectures", [ARCHITECTURE]) != [ARCHITECTURE] and config.get("model_type") != "qwen3":
            raise ValueError(f"architectures: expected [{ARCHITECTURE!r}], got {config.get('architectures')!r}")
        missing = [key for key in _SIZES if key not in config]
        if missing:
            raise ValueError(f"missing {missing}")
        heads = config["num_attention_heads"]
        return cls(
            config["num_hidden_layers"], config["hidden_size"], heads, config.get("num_key_value_heads", heads),
            config.get("head_dim", config["hidden_size"] // heads), config["intermediate_size"], config["vocab_size"],
            bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def layer_parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.ffn + 2 * self.hidden + 2 * self.head_dim

    @property
    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_parameters + embeddings + self.hidden


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_sequences: int


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU on the busiest stage."""

    weights: int
    teacher: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.teacher + self.gradients + self.optimizer + self.activations + self.logits + self.reserve


def estimate(model: ModelShape, layout: Layout, seq: int, fused_attention: bool, distributed_optimizer: bool, reserve: int) -> Estimate:
    t, p, b = layout.tp, layout.pp, layout.micro_batch_sequences
    embedding = model.vocab * model.hidden
    # The first stage holds the embedding, the last the output layer (a copy of it when tied).
    stage_parameters = (model.layers // p) * model.layer_parameters + embedding + (embedding if p == 1 and not model.tied else 0)
    shard = stage_parameters // t
    tokens = 2 * seq * b  # student and teacher streams travel together; only the student's are kept
    per_layer = seq * b * model.hidden * (10 + 24 / t)
    if not fused_attention:
        per_layer += 5 * model.heads * seq * seq * b / t
    activations = int(model.layers * per_layer)  # first 1F1B stage: PP micro-batches x layers/PP
    return Estimate(
        weights=2 * shard,
        teacher=2 * shard,
        gradients=4 * shard,
        optimizer=12 * shard // (layout.dp if distributed_optimizer else 1),
        activations=activations + 2 * tokens * model.hidden,  # plus the stream in flight
        logits=8 * b * seq * -(-model.vocab // t),
        reserve=reserve,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model: ModelShape, gpus: int, gpus_per_node: int, global_batch_sequences: int) -> list[Layout]:
    """Every TP x PP x DP that divides the model and the GPUs: TP within a node, dividing the
    attention heads, KV heads and MLP width; PP dividing the layers; DP the global batch."""
    layouts = []
    for tp in _divisors(min(gpus, gpus_per_node)):
        if model.heads % tp or model.kv_heads % tp or model.ffn % tp:
            continue
        for pp in _divisors(gpus // tp):
            if model.layers % pp:
                continue
            dp = gpus // (tp * pp)
            if global_batch_sequences % dp:
                continue
            per_rank = global_batch_sequences // dp
            layouts += [Layout(tp, pp, dp, b) for b in (1, 2, 4, 8) if per_rank % b == 0 and per_rank // b >= pp]
    return layouts


def choose(candidates: list[tuple[Layout, Estimate]], budget: int) -> tuple[Layout, Estimate] | None:
    """The fitting layout with the least model parallelism (then the fewest pipeline stages, whose
    bubbles cost time), then the largest micro-batch."""
    fitting = [(layout, est) for layout, est in candidates if est.total <= budget]
    if not fitting:
        return None
    return min(fitting, key=lambda item: (item[0].tp * item[0].pp, item[0].pp, -item[0].micro_batch_sequences))


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def run(args: argparse.Namespace) -> None:
    problems = []
    if args.gpus < 1 or args.gpus_per_node < 1:
        problems.append(f"--gpus and --gpus-per-node must be >= 1, got {args.gpus} and {args.gpus_per_node}")
    elif args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        problems.append(f"--gpus {args.gpus} is not a whole number of nodes of --gpus-per-node {args.gpus_per_node}")
    if args.seq < 1:
        problems.append(f"--seq must be >= 1, got {args.seq}")
    if problems:
        sys.exit("opsdc plan: error: " + "; ".join(problems))
    try:
        model = ModelShape.from_hf(Path(args.model))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        sys.exit(f"opsdc plan: error: --model {args.model}: {error}")
    budget = int(args.gpu_memory_gib * GIB)
    reserve = int(args.reserve_gib * GIB)
    layouts = candidate_layouts(model, args.gpus, args.gpus_per_node, args.global_batch_sequences)
    if not layouts:
        sys.exit(
            f"opsdc plan: error: no TP x PP x DP divides both the model (heads {model.heads}, KV heads "
            f"{model.kv_heads}, layers {model.layers}) and {args.gpus} GPUs with global batch "
            f"{args.global_batch_sequences}"
        )
    candidates = [
        (layout, estimate(model, layout, args.seq, args.attention == "fused", args.distributed_optimizer, reserve))
        for layout in layouts
    ]
    print(f"model: {args.model}: {model.parameters / 1e9:.2f} B parameters, {model.layers} layers, vocabulary {model.vocab}")
    print(f"{args.gpus} GPUs ({args.gpus_per_node} per node), {args.gpu_memory_gib:g} GiB each; sequence {args.seq} tokens; "
          f"attention {args.attention}; distributed optimizer {'on' if args.distributed_optimizer else 'off'}")
    header = f"{'TP':>3} {'PP':>3} {'DP':>3} {'micro':>5} | {'weights':>7} {'teacher':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'logits':>6} {'total':>6} GiB"
    print(header)
    best_per_layout = {}
    for layout, est in candidates:  # one row per TP x PP x DP: its largest fitting micro-batch, else its smallest
        key = (layout.tp, layout.pp, layout.dp)
        fits = est.total <= budget
        previous = best_per_layout.get(key)
        if previous is None or (fits and (previous[1].total > budget or layout.micro_batch_sequences > previous[0].micro_batch_sequences)):
            best_per_layout[key] = (layout, est)
    for layout, est in best_per_layout.values():
        verdict = "fits" if est.total <= budget else f"needs {_gib(est.total)} > {args.gpu_memory_gib:g}"
        print(f"{layout.tp:>3} {layout.pp:>3} {layout.dp:>3} {layout.micro_batch_sequences:>5} | {_gib(est.weights):>7} "
              f"{_gib(est.teacher):>7} {_gib(est.gradients):>6} {_gib(est.optimizer):>6} {_gib(est.activations):>6} "
              f"{_gib(est.logits):>6} {_gib(est.total):>6}  {verdict}")
    chosen = choose(candidates, budget)
    if chosen is None:
        smallest = min(candidates, key=lambda item: item[1].total)
        layout, est = smallest
        sys.exit(
            f"opsdc plan: error: no layout fits {args.gpu_memory_gib:g} GiB per GPU; the smallest, TP {layout.tp} PP "
            f"{layout.pp} DP {layout.dp} micro-batch {layout.micro_batch_sequences}, needs {_gib(est.total)} GiB "
            f"(weights + teacher + gradients + optimizer {_gib(est.weights + est.teacher + est.gradients + est.optimizer)}, "
            f"activations {_gib(est.activations)}, logits {_gib(est.logits)}); use more GPUs, a shorter --seq, "
            f"fused attention or the distributed optimizer"
        )
    layout, est = chosen
    print(f"chosen: parallel.tensor_parallel_size={layout.tp} parallel.pipeline_parallel_size={layout.pp} "
          f"parallel.data_parallel_size={layout.dp} train.micro_batch_prompts={layout.micro_batch_sequences} "
          f"parallel.distributed_optimizer={str(args.distributed_optimizer).lower()}  ({_gib(est.total)} GiB per GPU)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="choose TP/PP/DP and the micro-batch for a model and GPU count, with a memory estimate")
    plan.add_argument("--model", required=True, help="Hugging Face config.json (or its folder) of a Qwen3 model")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; tensor parallelism stays within a node (default 8)")
    plan.add_argument("--seq", type=int, required=True, help="longest student sequence, prompt + response tokens")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default 80, an H100)")
    plan.add_argument("--global-batch-sequences", type=int, default=32, help="rollouts per optimizer step (default 32, the paper's)")
    plan.add_argument("--attention", choices=("fused", "unfused"), default="unfused",
                      help="unfused: megatron's local spec, what this package builds today (keeps s^2 scores); fused: flash/TE")
    plan.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                      help="shard optimizer state over DP ranks (default on)")
    plan.add_argument("--reserve-gib", type=float, default=6.0, help="CUDA context, NCCL, fragmentation (default 6)")
    plan.set_defaults(run=run)
