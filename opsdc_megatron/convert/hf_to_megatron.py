"""Hugging Face folder -> megatron-core torch_dist checkpoint of the model (no optimizer), streamed.

Each of TP x PP ranks builds its GPTModel shard on the meta device and hands its
`sharded_state_dict()` to megatron's `dist_checkpointing.save`, so keys, global shapes, offsets,
replicas, ``common.pt``, ``metadata.json`` and the ``.metadata`` index are megatron's own. Only
the tensor bytes are streamed: megatron's writer would resolve every tensor before writing any,
so the save strategy (`_StreamingTorchDistSave`) writes with torch.distributed.checkpoint's file
writer instead, and its planner makes each tensor from the HF files (`hf_shard_makers`, through
the architecture's one name map) only when it is written. torch's writer keeps a file's tensors
until the file is complete, so a rank's files hold at most its largest tensor: peak memory is
about the largest tensor plus one such file, whatever the layer count (bench/convert.py).

Output folder::

    OUT/                  megatron torch_dist files (metadata.json, .metadata, *.distcp, common.pt)
    OUT/hf/               the source's config.json, generation config and tokenizer files
    OUT/conversion.json   source folder, layout and dtype

Everything is written to a temporary sibling folder and renamed when complete.

Run as ``python -m opsdc_megatron.convert.hf_to_megatron`` under torchrun (what `convert` does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from opsdc_megatron.convert.checks import ConversionError, check_hf_folder, require_new_output
from opsdc_megatron.files import fsync_folder, write_text_atomic
from opsdc_megatron.models.hf_folder import COPIED_FILES
from opsdc_megatron.models.hf_config import load_hf_config
from opsdc_megatron.models.qwen3.model import build_gpt_model, transformer_config_from_hf
from opsdc_megatron.models.qwen3.state_dict_adapter import hf_shard_makers
from opsdc_megatron.models.registry import architecture_of
from opsdc_megatron.torch_dist_save import InProcessTorchDistSave, PlansInMetadataPlanner

HF_FILES = "hf"
"""Subfolder of a converted checkpoint with the source's config and tokenizer files."""
CONVERSION_RECORD = "conversion.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_megatron_checkpoint(hf_dir: Path, out: Path, params_dtype: torch.dtype) -> None:
    """Collective over megatron's groups (already initialised): this rank's shard, saved into `out`."""
    config = load_hf_config(hf_dir)
    with torch.device("meta"):
        model = build_gpt_model(
            config,
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            params_dtype=params_dtype,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            empty_on_host=True,  # allocated on the default device (meta), not on a GPU, never initialised
            # local layers: Transformer Engine's need CUDA, which the ranks do not see; the checkpoint keys
            # are the same for every backend (megatron's sharded_state_dict_keys_map), so TE runs load it
            attention_backend="local",
        )
    makers = hf_shard_makers(model, hf_dir)  # checks the HF files first
    layout = model.sharded_state_dict()  # a second one: `save` rewrites the one it is given
    recipes = {
        (key, offset): (name, number)
        for name in makers
        for number, (key, offset, _) in enumerate(checkpoint_slices(layout[name], layout[name].data))
    }

    def make_slice(key: str, offset: tuple[int, ...]) -> torch.Tensor:
        """One checkpoint slice, read from the HF files (a fused gate/up shard is read once per slice)."""
        name, number = recipes[(key, offset)]
        return checkpoint_slices(layout[name], makers[name]())[number][2]

    dist_checkpointing.save(model.sharded_state_dict(), str(out), sharded_strategy=_StreamingTorchDistSave(make_slice))


class _StreamingTorchDistSave(InProcessTorchDistSave):
    """The in-process torch_dist save, with tensors made by `make_slice(key, global offset)`."""

    def __init__(self, make_slice: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__()
        self.make_slice = make_slice

    def writer(self, checkpoint_dir: Path) -> dcp.FileSystemWriter:
        return _BoundedFileWriter(checkpoint_dir, per_thread_copy_ahead=0)  # 0: no read-ahead

    def planner(self) -> PlansInMetadataPlanner:
        return _StreamingSavePlanner(self.make_slice)


class _StreamingSavePlanner(PlansInMetadataPlanner):
    """The save planner, except that each tensor is made when the writer asks for it."""

    def __init__(self, make_slice: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__()
        self.make_slice = make_slice

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.make_slice(write_item.index.fqn, tuple(write_item.index.offset))


class _BoundedFileWriter(dcp.FileSystemWriter):
    """torch's file writer with files of at most the rank's largest tensor.

    torch's writer holds every tensor of a file until the file is complete (its default, one file
    per rank, would hold the rank's whole shard). Objects (megatron's extra states) join the
    tensors' files, so every file holds tensors. Files are queued for torch's private `_write_data`
    (the same in torch 2.13 and 2.14).
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        sizes = [_chunk_bytes(item) for item in plan.items]
        files: queue.Queue = queue.Queue()
        for number, items in enumerate(bounded_groups(plan.items, sizes, max(sizes, default=0))):
            name = f"{plan.storage_data.prefix}{number}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)


def _chunk_bytes(item: WriteItem) -> int:
    """Bytes of a tensor item's chunk on this rank (0 for an object)."""
    if item.type == WriteItemType.BYTE_IO:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


Item = TypeVar("Item")


def bounded_groups(items: list[Item], sizes: list[int], max_bytes: int) -> list[list[Item]]:
    """Consecutive items grouped so that each group holds at most `max_bytes` (a larger item alone)."""
    groups: list[list[Item]] = []
    current_bytes = 0
    for item, size in zip(items, sizes):
        if not groups or current_bytes + size > max_bytes:
            groups.append([])
            current_bytes = 0
        groups[-1].append(item)
        current_bytes += size
    return groups


def checkpoint_slices(sharded: ShardedTensor | ShardedTensorFactory, data: torch.Tensor) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    """(key, global offset, view of `data`) for every checkpoint slice a parameter shard is made of.

    `data` has the parameter's shape; a fused parameter (gate/up) is several slices, and a layer's
    view carries megatron's leading layer axis. `sharded` keeps no reference to `data`.
    """
    own, sharded.data = sharded.data, data
    try:
        pieces = sharded.build() if isinstance(sharded, ShardedTensorFactory) else [sharded]
        return [
            (piece.key, tuple(piece.global_offset), piece.data.view((1,) * piece.prepend_axis_num + tuple(piece.local_shape)))
            for piece in pieces
        ]
    finally:
        sharded.data = own


def convert_hf_to_megatron(
    hf_dir: Path, out: Path, tensor_parallel_size: int, pipeline_parallel_size: int, virtual_pipeline_size: int | None = None
) -> Path:
    """Check the inputs, then write the checkpoint with TP x PP torchrun processes; returns `out`.

    ``virtual_pipeline_size`` is checked against the layer count and recorded: the torch_dist
    content does not depend on it (layers are stored by global number).

    Raises:
        ConversionError: bad input (before anything is written).
        RuntimeError: the conversion processes failed (nothing is left behind).
    """
    require_new_output(out)
    source = check_hf_folder(hf_dir)
    if source.other_dtypes:  # a megatron checkpoint keeps one params dtype: the embedding's (the bulk of the bytes)
        name, dtype = next(iter(source.other_dtypes.items()))
        warnings.warn(
            f"{hf_dir}: {len(source.other_dtypes)} tensor(s) stored in another dtype than the embedding's "
            f"{source.weights_dtype} (e.g. {name}: {dtype}) are converted to {source.weights_dtype}",
            stacklevel=2,
        )
    transformer_config_from_hf(source.config, tensor_parallel_size, pipeline_parallel_size)
    if virtual_pipeline_size is not None:
        if virtual_pipeline_size < 1:
            raise ConversionError(f"--vp: the virtual pipeline size must be at least 1, got {virtual_pipeline_size}")
        if virtual_pipeline_size > 1 and pipeline_parallel_size == 1:  # as the trainer's config refuses it
            raise ConversionError(f"--vp {virtual_pipeline_size} needs pipeline parallelism (--pp > 1), got --pp 1")
        stages = pipeline_parallel_size * virtual_pipeline_size
        if source.config.num_hidden_layers % stages:
            raise ConversionError(
                f"num_hidden_layers: expected a multiple of pipeline x virtual pipeline size = {stages}, "
                f"got {source.config.num_hidden_layers}"
            )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        world_size = tensor_parallel_size * pipeline_parallel_size
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}", "--standalone",
            "-m", "opsdc_megatron.convert.hf_to_megatron", "--hf", str(hf_dir), "--out", str(tmp),
            "--tp", str(tensor_parallel_size), "--pp", str(pipeline_parallel_size), "--dtype", _dtype_name(source.weights_dtype),
        ]
        # The ranks stream tensors through host memory and build the model on the meta device: on CPU, with
        # gloo. Visible GPUs would make them take one each (fewer GPUs than ranks: "invalid device ordinal")
        # and move a tied output layer's meta weight to CUDA, which fails.
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="")
        if subprocess.run(command, env=env).returncode != 0:
            raise RuntimeError(f"conversion processes failed (see their output above); nothing written to {out}")
        copy_hf_files(hf_dir, tmp / HF_FILES)
        record = {
            "source": str(hf_dir.resolve()), "architecture": architecture_of(source.config.to_dict()).name,
            "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
            "virtual_pipeline_size": virtual_pipeline_size, "params_dtype": _dtype_name(source.weights_dtype),
        }
        write_text_atomic(tmp / CONVERSION_RECORD, json.dumps(record, indent=2))
        for folder in (tmp / HF_FILES, tmp):  # megatron's metadata.json and common.pt are not synced: on disk before the rename
            fsync_folder(folder, files=True)
        tmp.rename(out)
        fsync_folder(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def copy_hf_files(source: Path, target: Path) -> None:
    """config.json, generation config and tokenizer files (no weights) of a HF folder."""
    target.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


def main(argv: list[str] | None = None) -> None:
    """One rank of the conversion (started by `convert_hf_to_megatron` under torchrun)."""
    from opsdc_megatron.parallel import destroy_distributed, init_distributed

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    args = parser.parse_args(argv)
    init_distributed(args.tp, args.pp)
    try:
        save_megatron_checkpoint(args.hf, args.out, DTYPES[args.dtype])
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
