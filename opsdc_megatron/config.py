"""Typed run configuration: one dataclass per concern, loaded from YAML with key=value overrides.

Precedence: command-line overrides > recipe YAML > the defaults below. Unknown keys and wrongly
typed values are errors naming the full key (OmegaConf structured configs); the config is never
changed at run time. Sizes say their unit (prompts, tokens) and scope (global, per micro-batch).
Defaults are the paper's settings (arXiv 2603.05433; ../shared/FACTS.md section 1), except one:
`distill.loss_normalization` defaults to a mean over the step's tokens, which no split of the batch
changes; the Qwen3 recipes set the paper's micro-batch mean.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.nodes import AnyNode, StringNode, ValueNode
from omegaconf.errors import OmegaConfBaseException

from opsdc_megatron.models.transformer_engine import FP8Config, check_fp8, fp8_token_multiple

SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""SGLang 0.5.23's --dtype choices."""
LOSS_NORMALIZATIONS = ("step_tokens", "micro_batch")

PAPER_INSTRUCTION_V1 = (
    "Solve the following math problem concisely and correctly. Be direct — avoid unnecessary "
    "elaboration, redundant steps, or restating the problem. Focus only on the key reasoning steps "
    "needed to reach the answer.\n\nThe last line of your response should be of the form Answer: "
    "$Answer (without quotes) where $Answer is the answer to the problem."
)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file, line or key."""


@dataclass
class ModelConfig:
    hf_path: str = MISSING
    """Hugging Face model folder (config.json, safetensors, tokenizer) the student starts from."""
    megatron_checkpoint: Optional[str] = None
    """If set, the student's initial weights come from this torch_dist checkpoint (`opsdc convert
    hf-to-megatron`, any TP/PP layout) instead of hf_path's safetensors; config and tokenizer still from hf_path."""
    params_dtype: str = "bf16"
    """Training dtype of the student and teacher: bf16 or fp32."""
    attention_backend: str = "auto"
    """auto (Transformer Engine's layer when TE imports, else sdpa on a GPU, local on CPU), te, sdpa
    (megatron's local layer with torch's fused SDPA attention) or local (megatron's DotProductAttention)."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 through Transformer Engine; output layer and KL stay bf16/fp32."""
    activation_recompute: str = "none"
    """none, or full: keep only each layer's input and recompute the layer in backward (about a third
    more compute; what `opsdc plan` picks when nothing fits without it)."""


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_chunks: int = 1
    """Model chunks per pipeline rank; > 1 runs megatron's interleaved 1F1B schedule."""
    data_parallel_size: int = 1
    """Processes = tensor x pipeline x data; `opsdc train` starts that many locally when not under torchrun."""
    distributed_optimizer: bool = False
    """Shard the optimizer state (and fp32 main weights) over data-parallel ranks (megatron's
    DistributedOptimizer); gradients are then reduce-scattered and weights all-gathered. Its
    checkpoints resume at another data-parallel size, but not with other tensor/pipeline sizes,
    overlap_grad_reduce or grad_reduce_bucket_elements: its state is stored per gradient bucket
    (train/checkpoint.py)."""
    sequence_parallel: bool = False
    """Split the activations outside the tensor-parallel matmuls (norms, residual adds) along the sequence
    over the tensor-parallel ranks (Megatron-LM's --sequence-parallel): their memory / TP, an all-gather and a
    reduce-scatter in place of each all-reduce. Needs tensor_parallel_size > 1; each micro-batch stream is
    padded to a multiple of tensor_parallel_size tokens."""
    overlap_grad_reduce: bool = False
    """Reduce (or reduce-scatter) the gradients bucket by bucket while the last micro-batch's backward
    still runs, instead of all at once after it (megatron DDP's overlap_grad_reduce, Megatron-LM's
    --overlap-grad-reduce). With pipeline stages, a stage starts its reductions after its last backward,
    as Megatron-LM's default --align-grad-reduce does."""
    grad_reduce_bucket_elements: Optional[int] = None
    """Gradient elements per reduction bucket with overlap_grad_reduce (Megatron-LM's --ddp-bucket-size);
    null = megatron's default, max(40M, 1M x data-parallel size). Smaller buckets start earlier, in more collectives."""


@dataclass
class DataConfig:
    train_prompts: str = MISSING
    """JSON Lines file of {"prompt", "answer"} records used for rollouts."""
    eval_prompts: Optional[str] = None
    """Held-out prompts evaluated during training to keep the best checkpoint."""
    max_prompt_tokens: int = 1024
    """Longest chat-formatted prompt, in tokens, the student's or the teacher's (with its instruction); longer is an error."""


@dataclass
class SGLangConfig:
    """SGLang rollout servers (rollout.engine = sglang); see opsdc_megatron/rollout/sglang/."""

    num_servers: int = 1
    tensor_parallel_size: int = 1
    """GPUs per server; 1 on CPU."""
    base_port: int = 30000
    """Server i listens on base_port + i."""
    router_port: int = 0
    """Port of sglang-router in front of the servers (for clients outside the trainer); 0 = no router."""
    dtype: str = "auto"
    """SGLang --dtype (SGLANG_DTYPES); auto: model.params_dtype."""
    mem_fraction_static: Optional[float] = None
    """GPU memory fraction for weights + KV cache; null = SGLang's default, which takes most of the GPU: allowed
    only for servers on their own GPUs (the SLURM job's rollout nodes), required when the trainer starts them on its own."""
    max_total_tokens: Optional[int] = None
    """KV-cache tokens per server; null = SGLang's default on GPU, 8192 on CPU."""
    weight_transport: str = "tensor"
    """tensor (colocated, shared memory), distributed (broadcast group: NCCL on GPU, gloo on CPU) or disk."""
    bucket_mib: int = 512
    """Weight-push bucket size in MiB."""
    max_concurrent_requests: int = 64
    """Rollout requests in flight over all servers."""
    request_timeout_s: float = 600.0
    stall_timeout_s: float = 60.0
    """A server with requests in flight that answers none for this long is probed; if hung, restarted."""
    max_attempts: int = 3
    """Sends per prompt before the step fails (a failed server's prompts go to the others)."""
    startup_timeout_s: float = 300.0
    python: Optional[str] = None
    """Interpreter of the SGLang environment; null = .venv-sglang/bin/python of this checkout."""
    server_urls: List[str] = field(default_factory=list)
    """Servers started outside the trainer, num_servers of them (the SLURM job's server step, slurm/opsdc_job.sh,
    sets it): the trainer sends rollouts and pushes weights to them, and never starts, restarts or stops them.
    Empty: trainer rank 0 starts num_servers servers (and the router on router_port) itself."""


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """hf: in-process transformers generation fed with the trainer's weights; sglang: SGLang servers."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    max_response_tokens: int = 8192
    generation_batch_prompts: int = 64
    """Prompts per generate call (a block); blocks are dealt to ranks, each seeded on its own."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class DistillConfig:
    instruction: str = PAPER_INSTRUCTION_V1
    """Conciseness instruction prepended to the teacher's prompt, in place of a task header it opens with (prompts.TASK_HEADERS)."""
    teacher_refresh_every: int = 50
    """Optimizer steps between hard copies of the student into the teacher; 0 keeps it frozen."""
    divergence: str = "reverse_kl"
    """reverse_kl (the method) or forward_kl (an ablation that collapses in the paper)."""
    loss_normalization: str = "step_tokens"
    """step_tokens: the mean per-token divergence over every response token of the optimizer step, the same
    objective for any micro-batch, data-parallel or packing split; micro_batch: each micro-batch's mean,
    averaged over the step's micro-batches (the paper's, verl's token-mean: a token weighs 1 / the response
    tokens of its micro-batch). distill/forward.py says more."""
    fused_output_layer: bool = False
    """Compute the output layer inside the reverse KL, token chunk by token chunk, so the [tokens, V/TP]
    logits never exist as one tensor; the gradients are computed in forward, the output weight's
    straight into megatron DDP's main_grad (loss/fused_output.py); reverse_kl only."""
    teacher_offload: bool = False
    """Keep the teacher's weights in (pinned) CPU memory and stream them to the GPU layer by layer,
    the next layer's copy overlapping the current layer's compute (distill/teacher_offload.py): for
    models where student and teacher do not both fit. Exact; costs host-to-device bandwidth."""


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_prompts: int = 32
    """Prompts per optimizer step across all data-parallel ranks (one rollout each)."""
    micro_batch_prompts: int = 2
    """Sequences per forward/backward on one data-parallel rank."""
    micro_batch_tokens: int = 0
    """> 0: instead of micro_batch_prompts sequences, group rollouts by length into micro-batches of
    at most this many tokens (student + teacher inputs) and balance tokens over data-parallel ranks.
    With an attention backend that takes packed sequences (te, sdpa) each micro-batch's sequences
    are concatenated with no padding (thd); with local they are right-padded, padding counted.
    With interleaved pipelining (parallel.virtual_pipeline_chunks > 1) the backend must be te or sdpa.
    Must hold the longest sequence: 2 x (max_prompt_tokens + max_response_tokens)."""
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.eval_prompts every N optimizer steps (and before training); 0 = never."""
    max_prompts: int = 128
    temperature: float = 0.6
    """The paper's evaluation sampling (as `opsdc eval`'s defaults), so that the best checkpoint is chosen
    under the sampling it is finally evaluated with."""
    top_p: float = 0.95
    top_k: int = 20
    max_response_tokens: int = 8192


@dataclass
class CheckpointConfig:
    save_every_steps: int = 50
    """0 saves only at the end of the run."""
    keep_last: int = 2
    """Complete checkpoints kept (the newest); at least 1."""
    resume: bool = True
    """Continue from out_dir/checkpoints/latest when it exists. A run that does not resume refuses an
    out_dir whose checkpoints/ already holds checkpoints (another run's): it would mix them with its own."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write every metric to <out_dir>/tensorboard/ as well as metrics.jsonl."""
    wandb_project: Optional[str] = None
    """Weights & Biases project; set it to log there too (needs `pip install wandb`)."""
    wandb_run_name: Optional[str] = None


@dataclass
class SlurmConfig:
    """The job's shape on a SLURM cluster (slurm/*.sbatch, `python -m opsdc_megatron.launch`); the trainer ignores it."""

    trainer_nodes: int = 1
    """Nodes running the trainer: tensor x pipeline x data processes, gpus_per_node on each node."""
    gpus_per_node: int = 8
    """GPUs per node of the allocation; 0 for CPU jobs (the toy recipes)."""
    rollout_nodes: int = 0
    """Nodes running the SGLang servers (rollout.engine=sglang), before the trainer nodes; 0 with the hf engine.
    A rollout node runs gpus_per_node / rollout.sglang.tensor_parallel_size servers."""


@dataclass
class RunConfig:
    out_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.tensor_parallel_size * p.pipeline_parallel_size * p.data_parallel_size


MAX_TIMEOUT_S = 1e9
"""Longest timeout a setting may give (31 years): a socket refuses a much larger one."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Checked here, before PyYAML moves the keys of a merged mapping (`<<: *anchor`, explicit keys
        win) into it, once per node: an anchored mapping flattened in place by the mapping that merges it
        holds a merged key and the key overriding it when its alias is read again."""
        if not getattr(node, "keys_checked", False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, Hashable):
                    continue  # PyYAML's own construct_mapping names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
            node.keys_checked = True
        super().flatten_mapping(node)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _recipe_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The recipe and the recipes it extends (`base: other.yaml`, relative to it), base first."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' recipes form a cycle")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the file name of one recipe, got {base!r}")
    if not (path.parent / base).is_file():
        raise ConfigError(f"{path}: base: {path.parent / base} not found (a base recipe's path is relative to the recipe)")
    return _recipe_chain(path.parent / base, seen + (path.resolve(),)) + [(path, data)]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the recipe (after the recipes it extends), then `key=value` overrides; validated."""
    config = merge_config(path, overrides)
    validate(config)
    return config


def merge_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """`load_config` without `validate`: the schema is checked (unknown keys, types), what the trainer supports is not."""
    source = "defaults"
    try:
        merged = OmegaConf.structured(RunConfig)
        for recipe, data in _recipe_chain(Path(path)) if path is not None else []:
            source = str(recipe)
            _check_text_fields(merged, data, recipe)
            merged = OmegaConf.merge(merged, data)
        for override in overrides:
            source = f"override '{override}'"
            if "=" not in override:
                raise ConfigError(f"{source}: expected key=value")
            merged = _apply_override(merged, *override.split("=", 1), source)
        source = f"{path or 'config'} with overrides" if overrides else str(path or "config")
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:  # all of them at once, not OmegaConf's first
            raise ConfigError(f"{source}: {', '.join(missing)} must be set, in the recipe or as key=value")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"{source}: {message}" + (f" (key: {key})" if key else "")) from None
    return config


def _check_text_fields(schema: DictConfig, data: dict, recipe: Path | str, prefix: str = "") -> None:
    """A text field given a number or a boolean: YAML 1.1 read the text as that (`off` is False, `1.10` is
    1.1, `0123` is 83) and OmegaConf would have stored its str(), not what the recipe says."""
    for key, value in data.items():
        node = schema._get_node(key, throw_on_missing_key=False) if isinstance(key, str) else None
        if isinstance(node, DictConfig) and isinstance(value, dict):
            _check_text_fields(node, value, recipe, f"{prefix}{key}.")
        elif isinstance(node, DictConfig) and value is not None:  # OmegaConf: "Merge error: int is not a subclass of TrainConfig"
            raise ConfigError(f"{recipe}: {prefix}{key}: expected a section of settings (key: value lines below it), got {value!r}")
        elif isinstance(node, StringNode) and isinstance(value, (bool, int, float)):
            kind = "boolean" if isinstance(value, bool) else type(value).__name__
            raise ConfigError(f"{recipe}: {prefix}{key}: expected text, YAML reads the value as the {kind} {value!r}; "
                              f"put it in quotes to keep it as written")


def _apply_override(merged: DictConfig, key: str, value: str, source: str) -> DictConfig:
    """One ``key=value``. For a scalar field the value's text as it is (OmegaConf converts it to the
    field's type): read as YAML, a string loses what follows '#', 'a: b' is a syntax error and '1:30'
    becomes 90. ``null`` or nothing is None; a value in quotes is a YAML string (escapes such as \\n
    apply). List and mapping fields are YAML. A `${` is text everywhere in an override."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(merged, parent_key) if parent_key else merged
    node = parent._get_node(leaf, throw_on_missing_key=False) if isinstance(parent, DictConfig) else None
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    if isinstance(node, ValueNode) and not isinstance(node, AnyNode) and not quoted:
        if isinstance(node, StringNode):
            value = _as_text(value)
        OmegaConf.update(merged, key, None if value in ("", "null") else value, merge=True)
        return merged
    try:  # parsed here, not by OmegaConf, whose interpolation grammar would refuse an unbalanced `${`
        parsed = yaml.load(value, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: malformed YAML value: {getattr(error, 'problem', None) or error}") from None
    if isinstance(node, DictConfig) and isinstance(parsed, dict):  # a section as a mapping: checked as a recipe's is
        _check_text_fields(node, parsed, source, f"{key}.")
    OmegaConf.update(merged, key, _escaped(parsed), merge=True)
    return merged


def _as_text(value: str) -> str:
    """`value` for OmegaConf as written: a `${x}` in it escaped, which OmegaConf would resolve as an
    interpolation; backslashes before it doubled, which OmegaConf would read as escapes."""
    return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", value)


def _escaped(value):
    """`value` (plain data) with `_as_text` applied to every string in it."""
    if isinstance(value, str):
        return _as_text(value)
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    return [_escaped(item) for item in value] if isinstance(value, list) else value


def stream_token_multiple(config: RunConfig) -> int:
    """What each micro-batch stream's token count must be a multiple of (distill/batch.py): Transformer
    Engine's FP8 GEMM alignment, and with sequence parallelism the tensor-parallel size (every rank holds
    an equal slice of the sequence)."""
    sequence_shards = config.parallel.tensor_parallel_size if config.parallel.sequence_parallel else 1
    return math.lcm(fp8_token_multiple(config.model.fp8), sequence_shards)


def validate(config: RunConfig) -> None:
    """Checks that need no model or process group; raises ConfigError naming the key."""
    p, t = config.parallel, config.train
    for key, value in (
        ("parallel.tensor_parallel_size", p.tensor_parallel_size),
        ("parallel.pipeline_parallel_size", p.pipeline_parallel_size),
        ("parallel.virtual_pipeline_chunks", p.virtual_pipeline_chunks),
        ("parallel.data_parallel_size", p.data_parallel_size),
        ("train.global_batch_prompts", t.global_batch_prompts),
        ("train.micro_batch_prompts", t.micro_batch_prompts),
        ("train.steps", t.steps),
        ("rollout.max_response_tokens", config.rollout.max_response_tokens),
        ("rollout.generation_batch_prompts", config.rollout.generation_batch_prompts),
        ("data.max_prompt_tokens", config.data.max_prompt_tokens),
        ("eval.max_prompts", config.eval.max_prompts),
        ("eval.max_response_tokens", config.eval.max_response_tokens),
        ("checkpoint.keep_last", config.checkpoint.keep_last),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in (
        ("checkpoint.save_every_steps", config.checkpoint.save_every_steps),
        ("eval.every_steps", config.eval.every_steps),
        ("train.micro_batch_tokens", t.micro_batch_tokens),
        ("train.seed", t.seed),
    ):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.seed >= 2**32:  # torch.manual_seed takes < 2**64, and megatron adds offsets per rank
        raise ConfigError(f"train.seed must be < 2**32, got {t.seed}")
    if not t.clip_grad > 0:  # megatron computes the grad norm (logged, checked) only when it clips
        raise ConfigError(f"train.clip_grad must be > 0 (a large value never clips), got {t.clip_grad}")
    # Comparisons written so that nan fails them. Transformer Engine's FusedAdam checks none of these, and
    # torch's AdamW (without TE) only once the model is built and loaded.
    for key, value, fits, expected in (
        ("train.lr", t.lr, 0 <= t.lr < math.inf, ">= 0"),
        ("train.adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "in [0, 1)"),
        ("train.adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "in [0, 1)"),
        ("train.adam_eps", t.adam_eps, 0 < t.adam_eps < math.inf, "> 0"),
        ("train.weight_decay", t.weight_decay, 0 <= t.weight_decay < math.inf, ">= 0"),
    ):
        if not fits:
            raise ConfigError(f"{key} must be {expected}, got {value}")
    for name, sampling in (("rollout", config.rollout), ("eval", config.eval)):
        if not 0 <= sampling.temperature < math.inf or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise ConfigError(
                f"{name}: temperature must be >= 0, top_p in (0, 1] and top_k >= 0 (0 = off), got temperature="
                f"{sampling.temperature}, top_p={sampling.top_p}, top_k={sampling.top_k}"
            )
    if p.virtual_pipeline_chunks > 1 and p.pipeline_parallel_size == 1:
        raise ConfigError(
            f"parallel.virtual_pipeline_chunks ({p.virtual_pipeline_chunks}) > 1 needs "
            f"parallel.pipeline_parallel_size > 1, got 1"
        )
    if t.global_batch_prompts % p.data_parallel_size:
        raise ConfigError(
            f"train.global_batch_prompts ({t.global_batch_prompts}) must divide evenly over "
            f"parallel.data_parallel_size ({p.data_parallel_size})"
        )
    per_rank = t.global_batch_prompts // p.data_parallel_size
    if per_rank % t.micro_batch_prompts:
        raise ConfigError(
            f"train.micro_batch_prompts ({t.micro_batch_prompts}) must divide the prompts per "
            f"data-parallel rank ({per_rank} = global_batch_prompts / data_parallel_size)"
        )
    longest_sequence = 2 * (config.data.max_prompt_tokens + config.rollout.max_response_tokens)
    if 0 < t.micro_batch_tokens < longest_sequence:
        raise ConfigError(
            f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be 0 or hold the longest sequence: "
            f"2 x (data.max_prompt_tokens + rollout.max_response_tokens) = {longest_sequence}"
        )
    if t.micro_batch_tokens and p.virtual_pipeline_chunks > 1 and config.model.attention_backend not in ("te", "sdpa"):
        raise ConfigError(
            f"train.micro_batch_tokens with parallel.virtual_pipeline_chunks > 1 packs sequences (the interleaved "
            f"schedule needs micro-batches of one shape): model.attention_backend must be te or sdpa, got "
            f"{config.model.attention_backend!r}"
        )
    micro_batches = per_rank // t.micro_batch_prompts
    pp = p.pipeline_parallel_size
    # With a token budget, distill/batch.py makes the number of micro-batches fit itself.
    if p.virtual_pipeline_chunks > 1 and not t.micro_batch_tokens and (micro_batches % pp or micro_batches < 2 * pp):
        raise ConfigError(
            f"interleaved pipeline (parallel.virtual_pipeline_chunks = {p.virtual_pipeline_chunks}): the "
            f"micro-batches per data-parallel rank ({micro_batches}) must be a multiple of "
            f"parallel.pipeline_parallel_size ({pp}) and at least twice it ({2 * pp}): with fewer, megatron's "
            f"interleaved schedule runs all of the first stage's micro-batches in warm-up, and its exchanges "
            f"between stages then deadlock on gloo (measured at 2 stages)"
        )
    if p.sequence_parallel and p.tensor_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel splits the sequence over tensor-parallel ranks: it needs parallel.tensor_parallel_size > 1, got 1")
    if p.grad_reduce_bucket_elements is not None and (not p.overlap_grad_reduce or p.grad_reduce_bucket_elements < 1):
        raise ConfigError(
            f"parallel.grad_reduce_bucket_elements must be null or >= 1 with parallel.overlap_grad_reduce=true (without "
            f"overlap megatron reduces all gradients in one bucket), got {p.grad_reduce_bucket_elements} with "
            f"overlap_grad_reduce={p.overlap_grad_reduce}"
        )
    if config.model.params_dtype not in ("bf16", "fp32"):
        raise ConfigError(f"model.params_dtype must be bf16 or fp32, got {config.model.params_dtype!r}")
    if config.model.attention_backend not in ("auto", "te", "sdpa", "local"):
        raise ConfigError(f"model.attention_backend must be auto, te, sdpa or local, got {config.model.attention_backend!r}")
    if config.model.activation_recompute not in ("none", "full"):
        raise ConfigError(f"model.activation_recompute must be none or full, got {config.model.activation_recompute!r}")
    if config.distill.teacher_offload and config.model.fp8.format is not None and config.model.fp8.param_gather:
        raise ConfigError(
            "distill.teacher_offload does not support model.fp8.param_gather (FP8 parameters are Transformer Engine "
            "tensor subclasses, which the host copies of distill/teacher_offload.py were not built or tested for); "
            "set model.fp8.param_gather=false"
        )
    if config.model.fp8.format is not None and config.model.fp8.param_gather and not config.parallel.distributed_optimizer:
        raise ConfigError(
            "model.fp8.param_gather needs parallel.distributed_optimizer=true (as megatron's --fp8-param-gather does): only the "
            "distributed optimizer takes its fp32 main weights from the high-precision initial values; the other would "
            "start from the FP8-rounded weights"
        )
    try:
        check_fp8(config.model.fp8)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.model.fp8.format is not None and config.model.attention_backend in ("sdpa", "local"):
        raise ConfigError(
            f"model.fp8 runs in Transformer Engine's layers: model.attention_backend must be te or auto, got "
            f"{config.model.attention_backend!r} (megatron's own layers would compute in {config.model.params_dtype} under FP8's padding)"
        )
    multiple = stream_token_multiple(config)
    rounded = 2 * -(-(longest_sequence // 2) // multiple) * multiple  # each of the two streams rounded up
    if 0 < t.micro_batch_tokens < rounded:
        raise ConfigError(
            f"train.micro_batch_tokens ({t.micro_batch_tokens}) must hold the longest sequence with each stream's tokens "
            f"in multiples of {multiple} (FP8's GEMMs, sequence-parallel slices): 2 x round_up(data.max_prompt_tokens + "
            f"rollout.max_response_tokens, {multiple}) = {rounded}"
        )
    if config.rollout.engine not in ("hf", "sglang"):
        raise ConfigError(f"rollout.engine must be hf or sglang, got {config.rollout.engine!r}")
    if config.rollout.sglang.weight_transport not in ("tensor", "distributed", "disk"):
        raise ConfigError(f"rollout.sglang.weight_transport must be tensor, distributed or disk, got {config.rollout.sglang.weight_transport!r}")
    for key in ("num_servers", "tensor_parallel_size", "bucket_mib", "max_concurrent_requests", "max_attempts"):
        if getattr(config.rollout.sglang, key) < 1:
            raise ConfigError(f"rollout.sglang.{key} must be >= 1, got {getattr(config.rollout.sglang, key)}")
    servers = config.rollout.sglang
    for key in ("request_timeout_s", "stall_timeout_s", "startup_timeout_s"):
        if not 0 < getattr(servers, key) <= MAX_TIMEOUT_S:  # a socket timeout past that overflows (inf: at the first request)
            raise ConfigError(f"rollout.sglang.{key} must be > 0 and at most {MAX_TIMEOUT_S:.0e} s, got {getattr(servers, key)}")
    if servers.dtype not in SGLANG_DTYPES:
        raise ConfigError(f"rollout.sglang.dtype must be one of SGLang's --dtype choices {', '.join(SGLANG_DTYPES)}, got {servers.dtype!r}")
    if servers.mem_fraction_static is not None and not 0 < servers.mem_fraction_static <= 1:
        raise ConfigError(f"rollout.sglang.mem_fraction_static must be in (0, 1] or null, got {servers.mem_fraction_static}")
    if servers.max_total_tokens is not None and servers.max_total_tokens < 1:
        raise ConfigError(f"rollout.sglang.max_total_tokens must be >= 1 or null, got {servers.max_total_tokens}")
    longest_response = max(config.rollout.max_response_tokens, config.eval.max_response_tokens if config.eval.every_steps else 0)
    if config.rollout.engine == "sglang" and servers.max_total_tokens is not None and servers.max_total_tokens < config.data.max_prompt_tokens + longest_response:
        raise ConfigError(  # else the longest requests do not fit the servers' KV cache, mid-run: refused or cut short
            f"rollout.sglang.max_total_tokens ({servers.max_total_tokens}, the servers' KV cache) must hold the longest request: "
            f"data.max_prompt_tokens + the longest of rollout.max_response_tokens and eval.max_response_tokens = "
            f"{config.data.max_prompt_tokens + longest_response}"
        )
    last_server_port = servers.base_port + servers.num_servers - 1
    if not 1 <= servers.base_port <= last_server_port <= 65535:
        raise ConfigError(f"rollout.sglang.base_port: servers listen on base_port .. base_port + num_servers - 1, which must be ports "
                          f"(1-65535), got {servers.base_port}..{last_server_port}")
    if servers.router_port and not (1 <= servers.router_port <= 65535 and not servers.base_port <= servers.router_port <= last_server_port):
        raise ConfigError(f"rollout.sglang.router_port must be 0 (no router) or a port (1-65535) outside the servers' "
                          f"{servers.base_port}..{last_server_port}, got {servers.router_port}")
    urls = config.rollout.sglang.server_urls
    if urls and len(urls) != config.rollout.sglang.num_servers:
        raise ConfigError(f"rollout.sglang.server_urls lists {len(urls)} servers, rollout.sglang.num_servers is {config.rollout.sglang.num_servers}")
    bad_urls = [url for url in urls if not url.startswith(("http://", "https://"))]
    if bad_urls:
        raise ConfigError(f"rollout.sglang.server_urls: expected http://HOST:PORT, got {bad_urls[0]!r}")
    if config.distill.divergence not in ("reverse_kl", "forward_kl"):
        raise ConfigError(f"distill.divergence must be reverse_kl or forward_kl, got {config.distill.divergence!r}")
    if config.distill.loss_normalization not in LOSS_NORMALIZATIONS:
        raise ConfigError(f"distill.loss_normalization must be one of {', '.join(LOSS_NORMALIZATIONS)}, got {config.distill.loss_normalization!r}")
    if config.distill.fused_output_layer and config.distill.divergence != "reverse_kl":
        raise ConfigError(f"distill.fused_output_layer computes the reverse KL only, but distill.divergence is {config.distill.divergence!r}")
    if not config.distill.instruction.strip():
        raise ConfigError("distill.instruction is empty: the teacher would read the student's prompt, and the KL would be 0")
    if config.distill.teacher_refresh_every < 0:
        raise ConfigError(f"distill.teacher_refresh_every must be >= 0, got {config.distill.teacher_refresh_every}")
    if config.eval.every_steps and not config.data.eval_prompts:
        raise ConfigError("eval.every_steps is set but data.eval_prompts is not")
    if config.log.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb_project is set but the wandb package is not installed (pip install wandb)")


def read_saved_config(path: str | Path) -> dict:
    """A config.yaml that `to_yaml` wrote, as plain data (an escaped `${` read back as the text it was)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def to_yaml(config: RunConfig) -> str:
    """The config as a recipe that loads back to the same config (a `${` in a string stays text)."""
    return OmegaConf.to_yaml(OmegaConf.create(_escaped(asdict(config))))
