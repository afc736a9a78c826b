"""Weights between Hugging Face names/shapes and megatron-core's tensor-parallel shards.

`NAME_MAP` here is Qwen3's; Qwen2/2.5 and Llama 3 have theirs beside it (`models.qwen2`,
`models.llama`, listed in `models.registry`), and `build_gpt_model` attaches the model's map as
``model.hf_name_map``. Loading a Hugging Face checkpoint into training, exporting the trained
weights every step to the rollout engine, checkpoint conversion (`opsdc_megatron.convert`) and the
SGLang weight push all go through that one map and the layouts below.

Each megatron parameter is made of one or more Hugging Face tensors and laid out over the TP ranks
in one of five ways (`Layout`):

* ``replicated``: the same tensor on every rank (norms);
* ``vocab``: rows split over ranks after padding the vocabulary to `padded_vocab_size`
  (the padding rows are zero on load and stripped on export);
* ``row``: columns split over ranks (row-parallel ``linear_proj``, ``linear_fc2``);
* ``qkv``: the fused ``linear_qkv`` weight (or Qwen2's bias) of a column-parallel layer. megatron
  stores it per query group, ``[q heads of group 0; k_0; v_0; q heads of group 1; k_1; v_1; ...]``,
  and each TP rank holds a contiguous run of whole groups;
* ``gate_up``: the fused SwiGLU ``linear_fc1``. Each TP rank holds ``[gate shard; up shard]``, so
  the full tensor is not a plain split of ``[gate; up]``.

Pipeline parallelism: a rank holds one model chunk per virtual stage; chunk-local layer numbers
become global ones through megatron's `get_transformer_layer_offset`. The embedding lives on the
first stage and the output layer on the last; with tied embeddings the last stage keeps its own copy
of the embedding as ``output_layer.weight`` (megatron all-reduces its gradient with the first
stage's), loaded from the input embedding and not exported a second time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from safetensors import safe_open

from opsdc_megatron.models.hf_folder import IGNORED_HF_TENSORS, hf_tensor_headers
from opsdc_megatron.models.transformer_engine import keep_as_fp8_initial_value

Layout = Literal["replicated", "vocab", "row", "qkv", "gate_up"]

NameMap = dict[str, tuple[Layout, tuple[str, ...]]]
"""megatron-core name -> (layout over TP ranks, Hugging Face names fused into it, in fused order).
"{i}" is the decoder layer index. `output_layer.weight` exists only with untied embeddings (and,
tied, on the last pipeline stage, where it is loaded from the input embedding)."""

NAME_MAP: NameMap = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.layers.{i}.input_layernorm.weight": ("replicated", ("model.layers.{i}.input_layernorm.weight",)),
    "decoder.layers.{i}.self_attention.linear_qkv.weight": (
        "qkv",
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
    ),
    "decoder.layers.{i}.self_attention.q_layernorm.weight": ("replicated", ("model.layers.{i}.self_attn.q_norm.weight",)),
    "decoder.layers.{i}.self_attention.k_layernorm.weight": ("replicated", ("model.layers.{i}.self_attn.k_norm.weight",)),
    "decoder.layers.{i}.self_attention.linear_proj.weight": ("row", ("model.layers.{i}.self_attn.o_proj.weight",)),
    "decoder.layers.{i}.pre_mlp_layernorm.weight": ("replicated", ("model.layers.{i}.post_attention_layernorm.weight",)),
    "decoder.layers.{i}.mlp.linear_fc1.weight": (
        "gate_up",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ),
    "decoder.layers.{i}.mlp.linear_fc2.weight": ("row", ("model.layers.{i}.mlp.down_proj.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}

# A Hugging Face tensor that carries no weights of its own when embeddings are tied (transformers also
# ignores it then); the RoPE tables some older checkpoints saved are hf_folder.IGNORED_HF_TENSORS.
_TIED_LM_HEAD = "lm_head.weight"
_OUTPUT_LAYER = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

# Transformer Engine's layer fuses each pre-norm into the linear layer after it
# (TELayerNormColumnParallelLinear); its weight is a parameter of that layer, under these names. The
# local layer keeps them as separate norms and checkpoints them under the fused names (megatron's
# sharded_state_dict_keys_map), so both layers share checkpoints and the name map lists one name.
_TE_FUSED_NORMS = {
    "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
}

HFSource = str | Path | Mapping[str, torch.Tensor]
"""A Hugging Face model folder (safetensors, single or sharded) or an HF-named state dict."""


class _Geometry:
    """The sizes the fused layouts need, read from the model (megatron config + HF vocabulary)."""

    def __init__(self, model: GPTModel) -> None:
        config = model.config
        self.hf_vocab_size: int = _hf_vocab_size(model)
        self.query_groups: int = config.num_query_groups
        self.heads_per_group: int = config.num_attention_heads // config.num_query_groups
        self.head_dim: int = config.kv_channels
        self.tp_size: int = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank: int = parallel_state.get_tensor_model_parallel_rank()


def _hf_vocab_size(model: GPTModel) -> int:
    vocab_size = getattr(model, "hf_vocab_size", None)
    if vocab_size is None:
        raise ValueError(
            "model has no hf_vocab_size: build it with opsdc_megatron.models.qwen3.model.build_gpt_model"
        )
    return vocab_size


def _unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside megatron wrappers (DistributedDataParallel, Float16Module)."""
    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise TypeError(f"expected a megatron GPTModel (or a wrapper of one), got {type(model).__name__}")
        inner = inner.module
    return inner


def _name_map(model: GPTModel) -> NameMap:
    name_map = getattr(model, "hf_name_map", None)
    if name_map is None:
        raise ValueError("model has no hf_name_map: build it with opsdc_megatron.models.qwen3.model.build_gpt_model")
    return name_map


def _chunks(model: torch.nn.Module | list[torch.nn.Module]) -> list[GPTModel]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), unwrapped."""
    return [_unwrap(chunk) for chunk in (model if isinstance(model, list) else [model])]


def _is_tied_output_copy(model: GPTModel, name: str) -> bool:
    """The last stage's copy of a tied embedding (exists only when the pipeline has 2+ stages)."""
    return name == _OUTPUT_LAYER and model.share_embeddings_and_output_weights


def _named_entries(model: GPTModel) -> list[tuple[str, torch.nn.Parameter, Layout, tuple[str, ...]]]:
    """(megatron name, parameter, layout, HF names) for every parameter of the model chunk, via its
    name map. Layer numbers are global (the chunk's local index plus megatron's layer offset)."""
    name_map = _name_map(model)
    offset = get_transformer_layer_offset(model.config, vp_stage=model.vp_stage)
    entries = []
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        template = _LAYER.sub("decoder.layers.{i}.", name) if match else name
        template = _TE_FUSED_NORMS.get(template, template)
        if _is_tied_output_copy(model, name):
            template = _EMBEDDING
        if template not in name_map:
            raise ValueError(f"megatron parameter {name!r} has no Hugging Face mapping in the name map")
        layout, hf_templates = name_map[template]
        layer = str(int(match.group(1)) + offset) if match else ""
        entries.append((name, param, layout, tuple(t.format(i=layer) for t in hf_templates)))
    return entries


def _all_hf_names(model: GPTModel) -> set[str]:
    """Every Hugging Face name the whole model (all pipeline stages) reads."""
    names = set()
    for template, (_, hf_templates) in _name_map(model).items():
        if template == _OUTPUT_LAYER and model.share_embeddings_and_output_weights:
            continue
        layers = range(model.config.num_layers) if "{i}" in template else [""]
        names.update(t.format(i=i) for t in hf_templates for i in layers)
    return names


# ---------------------------------------------------------------------------------------------
# Layout conversions: full Hugging Face tensors <-> one TP rank's shard.


def _to_shard(layout: Layout, hf: list[torch.Tensor], geo: _Geometry) -> torch.Tensor:
    """This TP rank's shard of a megatron parameter, from the full Hugging Face tensors."""
    rank, size = geo.tp_rank, geo.tp_size
    if layout == "replicated":
        return hf[0]
    if layout == "row":
        return hf[0].chunk(size, dim=1)[rank]
    if layout == "vocab":
        shard_rows = -(-geo.hf_vocab_size // size)
        rows = hf[0][rank * shard_rows : (rank + 1) * shard_rows]
        if rows.shape[0] == shard_rows:
            return rows  # a view: no copy of the (largest) tensor where no padding is needed
        shard = hf[0].new_zeros((shard_rows, *hf[0].shape[1:]))
        shard[: rows.shape[0]] = rows
        return shard
    if layout == "gate_up":
        return torch.cat([hf[0].chunk(size, dim=0)[rank], hf[1].chunk(size, dim=0)[rank]], dim=0)
    if layout == "qkv":
        q, k, v = hf
        trailing = q.shape[1:]  # (hidden,) for weights, () for biases
        groups = geo.query_groups
        fused = torch.cat(
            [
                q.view(groups, geo.heads_per_group * geo.head_dim, *trailing),
                k.view(groups, geo.head_dim, *trailing),
                v.view(groups, geo.head_dim, *trailing),
            ],
            dim=1,
        )
        return fused.chunk(size, dim=0)[rank].reshape(-1, *trailing)
    raise AssertionError(f"unknown layout {layout!r}")


def _from_shards(layout: Layout, shards: list[torch.Tensor], geo: _Geometry) -> list[torch.Tensor]:
    """The full Hugging Face tensors of a megatron parameter, from all TP ranks' shards in order.

    Every returned tensor owns fresh, contiguous memory (safe to save or keep across steps).
    """
    if layout == "replicated":
        return [shards[0].clone()]
    if layout == "row":
        return [torch.cat(shards, dim=1)]
    if layout == "vocab":
        full = torch.cat(shards, dim=0)
        return [full if full.shape[0] == geo.hf_vocab_size else full[: geo.hf_vocab_size].clone()]
    if layout == "gate_up":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return [torch.cat([gate for gate, _ in halves], dim=0), torch.cat([up for _, up in halves], dim=0)]
    if layout == "qkv":
        fused = torch.cat(shards, dim=0)
        trailing = fused.shape[1:]  # (hidden,) for weights, () for biases
        q_rows = geo.heads_per_group * geo.head_dim
        grouped = fused.view(geo.query_groups, q_rows + 2 * geo.head_dim, *trailing)
        q, k, v = grouped.split([q_rows, geo.head_dim, geo.head_dim], dim=1)
        return [part.clone(memory_format=torch.contiguous_format).view(-1, *trailing) for part in (q, k, v)]
    raise AssertionError(f"unknown layout {layout!r}")


def _expected_hf_shapes(layout: Layout, param: torch.Tensor, geo: _Geometry) -> list[torch.Size]:
    """Full HF shapes implied by this rank's parameter: the export conversion run on meta tensors."""
    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
    return [t.shape for t in _from_shards(layout, [meta] * geo.tp_size, geo)]


def _open_source(source: HFSource) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """(name -> shape for every tensor in the source, a reader of one tensor by name).

    A file is opened for each read: safetensors maps the file and returns tensors backed by the
    mapping, whose pages stay resident while the file is open; opened per read, they are released
    with the tensor, so reading a whole model never holds more than the tensors still in use.
    """
    if isinstance(source, Mapping):
        return {name: tuple(t.shape) for name, t in source.items()}, source.__getitem__
    folder = Path(source)
    headers = hf_tensor_headers(folder)

    def read(name: str) -> torch.Tensor:
        with safe_open(folder / headers[name].file, framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    return {name: header.shape for name, header in headers.items()}, read


def _checked_reader(gpt: GPTModel, entries: list, source: HFSource) -> Callable[[str], torch.Tensor]:
    """A reader of the source's tensors by name, after checking every name and shape `entries` read
    and that the source holds no tensor the whole model would not read.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors (all listed).
    """
    geo = _Geometry(gpt)
    shapes, read = _open_source(source)
    missing, misshaped, used = [], [], _all_hf_names(gpt)
    for _, param, layout, hf_names in entries:
        for hf_name, expected in zip(hf_names, _expected_hf_shapes(layout, param, geo)):
            if hf_name not in shapes:
                missing.append(hf_name)
            elif shapes[hf_name] != tuple(expected):
                misshaped.append(f"{hf_name}: expected {tuple(expected)}, got {shapes[hf_name]}")
    ignorable = {_TIED_LM_HEAD} if gpt.share_embeddings_and_output_weights else set()
    unexpected = sorted(n for n in shapes if n not in used and n not in ignorable and not IGNORED_HF_TENSORS.match(n))
    if missing or misshaped or unexpected:
        problems = [("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)]
        raise ValueError(
            "Hugging Face weights do not match the megatron model:\n"
            + "\n".join(f"  {kind}: {names}" for kind, names in problems if names)
        )
    return read


def load_hf_weights(model: torch.nn.Module | list[torch.nn.Module], hf_dir_or_state_dict: HFSource) -> None:
    """Copy Hugging Face weights into this rank's shards of `model` (in place).

    `model` is a GPTModel (or a wrapper of one) or this rank's list of pipeline chunks. Checks every
    name and shape this rank reads, and that the source holds no tensor the whole model would not
    read, before writing anything. Tensors are cast to the parameters' dtype.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors (all listed).
    """
    chunks = _chunks(model)
    geo = _Geometry(chunks[0])
    entries = [entry for chunk in chunks for entry in _named_entries(chunk)]
    read = _checked_reader(chunks[0], entries, hf_dir_or_state_dict)
    with torch.no_grad():
        for _, param, layout, hf_names in entries:
            shard = _to_shard(layout, [read(n) for n in hf_names], geo)
            param.copy_(shard)
            keep_as_fp8_initial_value(param, shard)


def hf_shard_makers(model: GPTModel, hf_dir_or_state_dict: HFSource) -> dict[str, Callable[[], torch.Tensor]]:
    """Parameter name -> a function that reads this rank's shard of it from the Hugging Face source.

    For writing a checkpoint tensor by tensor: `model` (one chunk; it may live on the meta device)
    gives only names, shapes and dtypes. Checks as `load_hf_weights` does, before returning. A
    shard is read when its function is called, contiguous and in the parameter's dtype.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors (all listed).
    """
    geo = _Geometry(model)
    entries = _named_entries(model)
    read = _checked_reader(model, entries, hf_dir_or_state_dict)

    def maker(layout: Layout, hf_names: tuple[str, ...], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        return lambda: _to_shard(layout, [read(n) for n in hf_names], geo).to(dtype).contiguous()

    return {name: maker(layout, hf_names, param.dtype) for name, param, layout, hf_names in entries}


def export_hf_state_dict(model: torch.nn.Module | list[torch.nn.Module], keep: bool = True) -> dict[str, torch.Tensor]:
    """The full Hugging Face-named state dict in host memory, identical on every rank that keeps it.

    `model` as in `load_hf_weights`. TP shards are all-gathered over the tensor-parallel group (one
    collective per sharded parameter, none for replicated ones), the vocabulary padding is
    stripped, and each full tensor goes to host memory at once: the device never holds more than
    one gathered parameter (a whole bf16 Qwen3-32B beside its shards would not fit an 80 GB GPU).
    With pipeline parallelism the stages then exchange their tensors one at a time over the
    pipeline group. Tensors are detached copies in the parameters' dtype; ``lm_head.weight`` is
    present only with untied embeddings. ``keep=False``: this rank takes part in the collectives
    and returns an empty dict (a rank that does not use the weights holds no copy of the model).
    """
    chunks = _chunks(model)
    geo = _Geometry(chunks[0])
    group = parallel_state.get_tensor_model_parallel_group()
    state: dict[str, torch.Tensor] = {}
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    staged = dist.get_world_size(pipeline) > 1 and _any_keeps(keep, pipeline)  # this stage's tensors go to the stages that keep them
    with torch.no_grad():
        for chunk in chunks:
            for name, param, layout, hf_names in _named_entries(chunk):
                if _is_tied_output_copy(chunk, name):
                    continue  # the first stage exports the tied embedding
                local = param.detach()
                if layout == "replicated" or geo.tp_size == 1:
                    shards = [local]
                else:
                    shards = [torch.empty_like(local) for _ in range(geo.tp_size)]
                    dist.all_gather(shards, local, group=group)
                if keep or staged:
                    state.update((hf_name, t.to("cpu", copy=True)) for hf_name, t in zip(hf_names, _from_shards(layout, shards, geo)))
        if staged:
            state = _exchange_stages(state, pipeline, keep)
    return state if keep else {}


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take their tensors (NCCL: this rank's GPU; gloo: host memory)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _any_keeps(keep: bool, pipeline: dist.ProcessGroup) -> bool:
    """Whether a stage of this pipeline group keeps the weights: in the others (with SGLang, every group but rank 0's)
    no stage copies its tensors to host memory or sends them."""
    wanted = torch.tensor([int(keep)], device=_group_device(pipeline))
    dist.all_reduce(wanted, op=dist.ReduceOp.MAX, group=pipeline)
    return bool(wanted.item())


def _exchange_stages(state: dict[str, torch.Tensor], pipeline: dist.ProcessGroup, keep: bool) -> dict[str, torch.Tensor]:
    """Every stage's host tensors on every stage that keeps them, in stage order: the names, shapes
    and dtypes as objects, then one broadcast per tensor through the device the group's backend
    uses (NCCL: this rank's GPU, one tensor at a time; gloo: host memory)."""
    manifests: list[list[tuple[str, tuple[int, ...], torch.dtype]] | None] = [None] * dist.get_world_size(pipeline)
    dist.all_gather_object(manifests, [(name, tuple(t.shape), t.dtype) for name, t in state.items()], group=pipeline)
    device = _group_device(pipeline)
    stage, ranks = dist.get_rank(pipeline), dist.get_process_group_ranks(pipeline)
    everything: dict[str, torch.Tensor] = {}
    for source, manifest in enumerate(manifests):
        for name, shape, dtype in manifest:
            if source == stage:
                dist.broadcast(state[name].to(device), src=ranks[source], group=pipeline)
                everything[name] = state[name]
            else:
                received = torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(received, src=ranks[source], group=pipeline)
                if keep:
                    everything[name] = received.to("cpu")
    return everything
