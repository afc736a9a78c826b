"""Megatron torch_dist checkpoint (any TP/PP layout) -> Hugging Face folder, streamed.

The megatron side is read tensor by tensor: a GPTModel built on the meta device at TP=1 names
every parameter's checkpoint key and global offset (its own `sharded_state_dict()`, so nothing
is guessed), and a torch.distributed.checkpoint load planner reads just those slices (one layer
of one parameter) from the files. Tensors go through the architecture's name map
(`_from_shards` at TP=1) and are written as safetensors shards of at most ``max_shard_bytes``;
peak memory is about one output shard plus the largest tensor, whatever the model size.

Works on a converted checkpoint (`hf_to_megatron`, config and tokenizer in its ``hf/``) and on a
training checkpoint (``checkpoints/step_N``: the student; config from ``--hf-config`` or the run's
``config.yaml``). Needs megatron's groups at TP=1, PP=1 (for the meta model) and no collectives.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from safetensors.torch import save_file
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from transformers import GenerationConfig

from opsdc_megatron.config import read_saved_config
from opsdc_megatron.convert.checks import ConversionError, check_megatron_checkpoint, require_new_output
from opsdc_megatron.convert.hf_to_megatron import HF_FILES, bounded_groups, checkpoint_slices, copy_hf_files
from opsdc_megatron.distill.teacher import TEACHER_PREFIX
from opsdc_megatron.files import fsync_folder
from opsdc_megatron.models.hf_folder import write_config_dtype
from opsdc_megatron.models.hf_config import load_hf_config
from opsdc_megatron.models.qwen3.model import build_gpt_model
from opsdc_megatron.models.qwen3.state_dict_adapter import Layout, _expected_hf_shapes, _from_shards, _Geometry, _named_entries
from opsdc_megatron.parallel import destroy_distributed, init_distributed

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX = "model.safetensors.index.json"


class _SliceLoadPlanner(LoadPlanner):
    """Reads requested slices of checkpoint tensors into caller-owned buffers (single process)."""

    def __init__(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        self.requests = requests  # (checkpoint key, global offset, destination of the slice's shape)
        self.destinations: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, offset, destination in self.requests:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=destination.shape)
            for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]):
                self.destinations[(key, tuple(item.dest_index.offset))] = destination
                items.append(item)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise AssertionError(f"unexpected non-tensor item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        destination = self.destinations[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            destination = destination.narrow(dim, start, length)
        return destination

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """The data was copied into the destination view in place."""


def find_hf_config(ckpt: Path) -> Path:
    """Where a checkpoint's HF config and tokenizer are: its ``hf/`` or the training run's model folder."""
    if (ckpt / HF_FILES / "config.json").is_file():
        return ckpt / HF_FILES
    run_config = ckpt.parent.parent / "config.yaml"  # out_dir/checkpoints/step_N
    if run_config.is_file():
        return Path(read_saved_config(run_config)["model"]["hf_path"])
    raise ConversionError(
        f"{ckpt}: no {HF_FILES}/config.json and no training run's config.yaml two levels up; "
        f"pass --hf-config with the Hugging Face folder the checkpoint came from"
    )


def export_megatron_to_hf(
    ckpt: Path, out: Path, hf_config_dir: Path, dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write `out` as a HF folder (sharded safetensors + index, config, generation config, tokenizer).

    `dtype` defaults to the checkpoint's. Written to a temporary sibling, renamed when complete.

    Raises:
        ConversionError: the checkpoint is missing, not torch_dist, or does not match the config.
    """
    require_new_output(out)
    check_megatron_checkpoint(ckpt)
    if not (hf_config_dir / "config.json").is_file():  # its tokenizer and generation files are copied too
        raise ConversionError(f"{hf_config_dir}: not a folder with a config.json; --hf-config takes the Hugging Face model's folder")
    config = load_hf_config(hf_config_dir)
    reader = dcp.FileSystemReader(str(ckpt))
    metadata = reader.read_metadata()
    with torch.device("meta"):
        stored_dtype = checkpoint_dtype(ckpt, metadata)
        model = build_gpt_model(config, 1, 1, params_dtype=stored_dtype, empty_on_host=True)  # meta, not a GPU
    geo = _Geometry(model)
    sharded = model.sharded_state_dict()
    entries = [(name, layout, hf_names, param) for name, param, layout, hf_names in _named_entries(model)]
    _check_matches(entries, sharded, metadata, ckpt, hf_config_dir)
    check_vocabulary_padding(ckpt, config.vocab_size)
    out_dtype = dtype or stored_dtype
    shards = _plan_shards(entries, geo, out_dtype, max_shard_bytes)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        weight_map, total_bytes = {}, 0
        for number, shard in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = _read_shard(shard, sharded, reader, geo, stored_dtype, out_dtype)
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_configs(hf_config_dir, tmp, config, out_dtype)
        fsync_folder(tmp, files=True)  # on disk before the rename: `out` appears complete or not at all
        tmp.rename(out)
        fsync_folder(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_in_this_process(
    ckpt: Path, out: Path, hf_config_dir: Path | None = None, dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """`export_megatron_to_hf` from a plain process (`opsdc convert megatron-to-hf`, `opsdc eval`).

    Sets up a one-process world for the meta model and tears it down; `hf_config_dir` defaults to
    `find_hf_config(ckpt)`.
    """
    check_megatron_checkpoint(ckpt)  # before the config lookup, whose error would send the user the wrong way
    hf_config_dir = hf_config_dir or find_hf_config(ckpt)
    init_distributed(1, 1)
    try:
        return export_megatron_to_hf(ckpt, out, hf_config_dir, dtype, max_shard_bytes)
    finally:
        destroy_distributed()


def checkpoint_dtype(ckpt: Path, metadata: Metadata | None = None) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (its embedding's): what an export writes by default."""
    key = "embedding.word_embeddings.weight"
    entry = (metadata or dcp.FileSystemReader(str(ckpt)).read_metadata()).state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata):
        raise ConversionError(f"{ckpt}: no tensor {key!r} (not a GPT model checkpoint?)")
    return entry.properties.dtype


VOCABULARY_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
TRAINING_STATE_PREFIXES = ("optimizer.", TEACHER_PREFIX)
"""Keys of a training checkpoint that are not the student: the optimizer's state (megatron's prefix)
and the teacher snapshot, held by checkpoints from before the teacher had folders of its own (train/checkpoint.py)."""


def read_failure(error: BaseException) -> BaseException:
    """The first failing rank's exception inside torch's `CheckpointException` (a BaseException, whose
    text is every rank's traceback), or the exception itself when it is another or carries none."""
    return next(iter(error.failures.values()))[0] if isinstance(error, CheckpointException) and error.failures else error


def check_vocabulary_padding(ckpt: Path, vocab_size: int) -> None:
    """Rows past the config's vocabulary in the checkpoint's embedding and output layer are zero (the
    tensor-parallel padding), not tokens of a larger vocabulary that a load would silently cut off.

    Reads only those rows. Raises:
        ConversionError: a padding row holds weights, or the checkpoint has fewer rows than the config's
            vocabulary (padding only adds rows: another model, whose missing rows a load fills with zeros).
    """
    reader = dcp.FileSystemReader(str(ckpt))
    requests = []
    for key, stored in reader.read_metadata().state_dict_metadata.items():
        if key in VOCABULARY_KEYS and isinstance(stored, TensorStorageMetadata) and stored.size[0] < vocab_size:
            raise ConversionError(
                f"{ckpt}: {key} has {stored.size[0]} rows, fewer than the config's vocabulary of {vocab_size} tokens: "
                f"pass the config of the model the checkpoint was made from"
            )
        if key in VOCABULARY_KEYS and isinstance(stored, TensorStorageMetadata) and stored.size[0] > vocab_size:
            rows = torch.empty((stored.size[0] - vocab_size, *stored.size[1:]), dtype=stored.properties.dtype)
            requests.append((key, (vocab_size, *[0] * (len(stored.size) - 1)), rows))
    if requests:
        try:
            dcp.load({}, storage_reader=reader, planner=_SliceLoadPlanner(requests), no_dist=True)
        except CheckpointException as error:  # a BaseException: nothing above would name the checkpoint
            raise RuntimeError(f"{ckpt}: reading the checkpoint failed: {read_failure(error)}") from None
    nonzero = [f"{key} has {vocab_size + rows.shape[0]} rows" for key, _, rows in requests if rows.any()]
    if nonzero:
        raise ConversionError(
            f"{ckpt}: a larger vocabulary than the config's {vocab_size} tokens ({', '.join(nonzero)}, "
            f"and the rows past {vocab_size} are not zero padding): pass the config of the model the checkpoint was made from"
        )


def _check_matches(entries, sharded: dict, metadata: Metadata, ckpt: Path, hf_config_dir: Path) -> None:
    """The checkpoint holds exactly the model the config implies: each of its tensors with its global
    shape (vocabulary rows may be padded, see `check_vocabulary_padding`) and no other model tensor
    (an untied output layer under a tied config, QK-norms under a config without them)."""
    problems, read = [], set()
    for name, _, _, _ in entries:
        pieces = sharded[name].build() if isinstance(sharded[name], ShardedTensorFactory) else [sharded[name]]
        for piece in pieces:
            read.add(piece.key)
            stored = metadata.state_dict_metadata.get(piece.key)
            if stored is None:
                problems.append(f"missing {piece.key}")
                continue
            size, expected = tuple(stored.size), tuple(piece.global_shape)
            padded_rows_ok = piece.allow_shape_mismatch and size[1:] == expected[1:] and size[0] >= expected[0]
            if size != expected and not padded_rows_ok:
                problems.append(f"{piece.key}: config implies {expected}, checkpoint has {size}")
    unused = [
        key for key, stored in metadata.state_dict_metadata.items()
        if isinstance(stored, TensorStorageMetadata) and key not in read and not key.startswith(TRAINING_STATE_PREFIXES)
    ]
    problems += [f"{key}: in the checkpoint, not in the model the config describes" for key in unused]
    if problems:
        unique = sorted(set(problems))
        raise ConversionError(f"{ckpt} does not match {hf_config_dir / 'config.json'}:\n  " + "\n  ".join(unique))


def _plan_shards(entries, geo: _Geometry, dtype: torch.dtype, max_shard_bytes: int) -> list[list]:
    """Consecutive parameters grouped into output files of at most `max_shard_bytes` (a larger tensor alone)."""
    item_bytes = torch.empty((), dtype=dtype).element_size()
    sizes = [sum(shape.numel() for shape in _expected_hf_shapes(layout, param, geo)) * item_bytes for _, layout, _, param in entries]
    return bounded_groups(entries, sizes, max_shard_bytes)


def _read_shard(shard, sharded: dict, reader, geo: _Geometry, stored_dtype: torch.dtype, out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF tensors of one output file: one torch.distributed.checkpoint read of their slices."""
    buffers: list[tuple[Layout, tuple[str, ...], torch.Tensor]] = []
    requests: list[tuple[str, tuple[int, ...], torch.Tensor]] = []
    for name, layout, hf_names, param in shard:
        buffer = torch.empty(param.shape, dtype=stored_dtype)
        requests += checkpoint_slices(sharded[name], buffer)
        buffers.append((layout, hf_names, buffer))
    try:
        dcp.load({}, storage_reader=reader, planner=_SliceLoadPlanner(requests), no_dist=True)
    except CheckpointException as error:
        raise RuntimeError(f"{reader.path}: reading the checkpoint failed: {read_failure(error)}") from None
    del requests  # views of the buffers
    tensors = {}
    while buffers:  # each megatron buffer is released as soon as its HF tensors exist
        layout, hf_names, buffer = buffers.pop(0)
        for hf_name, tensor in zip(hf_names, _from_shards(layout, [buffer], geo)):
            tensors[hf_name] = tensor.to(out_dtype).contiguous()
        del buffer
    return tensors


def _write_configs(source: Path, target: Path, config, dtype: torch.dtype) -> None:
    copy_hf_files(source, target)
    write_config_dtype(target, dtype)
    if not (target / "generation_config.json").is_file():
        GenerationConfig.from_model_config(config).save_pretrained(target)
