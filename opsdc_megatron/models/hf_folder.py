"""A Hugging Face model folder: its tensors' headers read without the data, and the folder written atomically
(weights, config, generation config, tokenizer)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from safetensors import SafetensorError, safe_open

from opsdc_megatron.files import fsync_folder

if TYPE_CHECKING:  # torch at run time only where weights are written: `opsdc report` reads the metadata without it
    import torch

IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
"""Tensors older transformers saved that loading ignores (the non-persistent RoPE buffer)."""


class TensorHeader(NamedTuple):
    """A tensor as its safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: str
    """safetensors' name of the dtype: "BF16", "F32", ..."""
    file: str
    """The shard that holds it, relative to the folder."""


def hf_tensor_headers(folder: str | Path) -> dict[str, TensorHeader]:
    """Name -> header of every tensor in a Hugging Face folder (its shards' headers only, no data read).

    Raises:
        FileNotFoundError: no weights, or shards the index names are missing.
        ValueError: a shard that is no safetensors file, or cut short.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    missing_files = [file for file in files if not (folder / file).is_file()]
    if missing_files:
        raise FileNotFoundError(f"{index}: weight shards missing from {folder}: {missing_files}")
    headers: dict[str, TensorHeader] = {}
    for file in files:
        try:
            with safe_open(folder / file, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    headers[name] = TensorHeader(tuple(tensor.get_shape()), tensor.get_dtype(), file)
        except SafetensorError as error:  # e.g. a shard cut short by an interrupted download
            raise ValueError(f"{folder / file}: not a readable safetensors file ({error})") from None
    return headers


COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


TRAINED_STEPS_KEY = "opsdc_trained_steps"
"""safetensors metadata of a training run's exports (best_hf, final_hf): the optimizer steps of their weights.
An evaluation records it, and `opsdc report` sees an export rewritten since its evaluation (a resumed run)."""


def write_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """config.json names the dtype the weights are stored in (transformers loads them in it by default: an
    fp32-trained model whose config said bfloat16 lost its small updates); a file that already does stays
    byte for byte."""
    path = folder / "config.json"
    config_json = json.loads(path.read_text(encoding="utf-8"))
    dtype_name = str(dtype).removeprefix("torch.")
    keys = [key for key in ("dtype", "torch_dtype") if key in config_json] or ["torch_dtype"]
    if any(config_json.get(key) != dtype_name for key in keys):
        config_json.update(dict.fromkeys(keys, dtype_name))
        path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_hf_folder(
    state_dict: dict[str, torch.Tensor], source_dir: str | Path, out_dir: str | Path, trained_steps: int | None = None
) -> Path:
    """Weights from `state_dict`, every other file from `source_dir`; replaces `out_dir` atomically (a
    crash leaves the old folder or the new one, both complete on disk) and durably. `trained_steps`: a
    training run's export, recorded in the weights' metadata (`TRAINED_STEPS_KEY`)."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    _take_back_old(out_dir)  # first: a save that fails must not leave no folder at all
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPIED_FILES:
        if (source_dir / name).exists():
            shutil.copy2(source_dir / name, tmp / name)
    from safetensors.torch import save_file

    metadata = {"format": "pt", **({TRAINED_STEPS_KEY: str(trained_steps)} if trained_steps is not None else {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / "model.safetensors"), metadata=metadata)
    floating = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
    if (tmp / "config.json").is_file() and len(floating) == 1:
        write_config_dtype(tmp, floating.pop())
    fsync_folder(tmp, files=True)
    return replace_folder(tmp, out_dir)


def read_trained_steps(folder: str | Path) -> int | None:
    """What `save_hf_folder` recorded of a run's export; None for another folder (not a run's export, sharded
    weights, none readable)."""
    path = Path(folder) / "model.safetensors"
    try:
        with safe_open(str(path), framework="numpy") as weights:
            recorded = (weights.metadata() or {}).get(TRAINED_STEPS_KEY)
    except (OSError, SafetensorError):
        return None
    return int(recorded) if recorded is not None and recorded.isdigit() else None


def _take_back_old(out_dir: Path) -> None:
    """A crash between replace_folder's two renames leaves only `out_dir.old`, the complete folder."""
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists() and not out_dir.exists():
        old.rename(out_dir)


def replace_folder(new: Path, out_dir: Path) -> Path:
    """Renames the complete folder `new` to `out_dir`, replacing it so that a crash leaves one of the two whole
    (`out_dir.old` while they swap, taken back here the next time)."""
    _take_back_old(out_dir)
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash after the last replacement
    if out_dir.exists():
        out_dir.rename(old)
    new.rename(out_dir)
    fsync_folder(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
