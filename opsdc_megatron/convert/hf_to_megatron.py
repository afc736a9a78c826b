"""Hugging Face folder -> megatron-core torch_dist checkpoint of the model (no optimizer).

Each of TP x PP ranks builds its shard of the megatron GPTModel, copies its part of the HF
weights in (`load_hf_weights`, one tensor read at a time) and megatron's `dist_checkpointing.save`
writes it: the keys and global shapes are GPTModel's own. A rank holds 1 / (TP x PP) of the model.

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
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from opsdc_megatron.convert.checks import ConversionError, check_hf_folder, require_new_output
from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.models.hf_folder import COPIED_FILES
from opsdc_megatron.models.qwen3.model import build_gpt_model, load_hf_config, transformer_config_from_hf
from opsdc_megatron.models.qwen3.state_dict_adapter import load_hf_weights
from opsdc_megatron.models.registry import architecture_of

HF_FILES = "hf"
"""Subfolder of a converted checkpoint with the source's config and tokenizer files."""
CONVERSION_RECORD = "conversion.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_megatron_checkpoint(hf_dir: Path, out: Path, params_dtype: torch.dtype) -> None:
    """Collective over megatron's groups (already initialised): this rank's shard, saved into `out`."""
    config = load_hf_config(hf_dir)
    model = build_gpt_model(
        config,
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=params_dtype,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    load_hf_weights(model, hf_dir)
    dist_checkpointing.save(model.sharded_state_dict(), str(out))


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
    transformer_config_from_hf(source.config, tensor_parallel_size, pipeline_parallel_size)
    if virtual_pipeline_size is not None:
        stages = pipeline_parallel_size * virtual_pipeline_size
        if virtual_pipeline_size < 1 or source.config.num_hidden_layers % stages:
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
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if subprocess.run(command, env=env).returncode != 0:
            raise RuntimeError(f"conversion processes failed (see their output above); nothing written to {out}")
        copy_hf_files(hf_dir, tmp / HF_FILES)
        record = {
            "source": str(hf_dir.resolve()), "architecture": architecture_of(source.config.to_dict()).name,
            "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
            "virtual_pipeline_size": virtual_pipeline_size, "params_dtype": _dtype_name(source.weights_dtype),
        }
        write_text_atomic(tmp / CONVERSION_RECORD, json.dumps(record, indent=2))
        tmp.rename(out)
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
