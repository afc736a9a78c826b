"""Input checks of `opsdc convert`, run before any process starts or any file is written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from opsdc_megatron.models.hf_config import load_hf_config
from opsdc_megatron.models.hf_folder import IGNORED_HF_TENSORS, hf_tensor_headers

DIST_CHECKPOINT_METADATA = "metadata.json"
_EMBEDDING = "model.embed_tokens.weight"
_TIED_LM_HEAD = "lm_head.weight"


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the folder, file or field."""


@dataclass(frozen=True)
class HFModelFolder:
    path: Path
    config: PretrainedConfig
    weights_dtype: torch.dtype
    """The dtype the weights are stored in (of the input embedding)."""
    other_dtypes: dict[str, torch.dtype]
    """Weights stored in another dtype than the embedding's (fp32 norms in a bf16 model, say)."""


def require_new_output(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"{out}: output folder exists; remove it or choose another --out")


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""The weight dtypes a model folder may store (safetensors' names)."""


def check_hf_folder(folder: Path) -> HFModelFolder:
    """A HF model folder whose weights (names and shapes) match its config.json.

    The reference is transformers' own model for the config, built on the meta device.

    Raises:
        ConversionError: missing folder, config, shards or tensors; mis-shaped or unexpected tensors;
            an unsupported architecture.
    """
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        config = load_hf_config(folder)
        headers = hf_tensor_headers(folder)
    except (ValueError, FileNotFoundError) as error:  # each names its file
        raise ConversionError(str(error)) from None
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    shapes = {name: header.shape for name, header in headers.items() if not IGNORED_HF_TENSORS.match(name)}
    if config.tie_word_embeddings:
        expected.pop(_TIED_LM_HEAD, None)
        shapes = {name: shape for name, shape in shapes.items() if name != _TIED_LM_HEAD}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [f"{name}: config implies {expected[name]}, file has {shapes[name]}" for name in sorted(set(expected) & set(shapes)) if expected[name] != shapes[name]]
    if missing or unexpected or misshaped:
        problems = [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
        raise ConversionError(
            f"{folder}: config.json does not match the weights:\n"
            + "\n".join(f"  {kind}: {names}" for kind, names in problems if names)
        )
    stored = {}
    for name in expected:
        header = headers[name]
        if header.dtype not in _DTYPES:
            raise ConversionError(f"{folder / header.file}: {name} is stored as {header.dtype}; expected one of {sorted(_DTYPES)}")
        stored[name] = _DTYPES[header.dtype]
    dtype = stored[_EMBEDDING]
    return HFModelFolder(folder, config, dtype, {name: other for name, other in sorted(stored.items()) if other != dtype})


def check_megatron_checkpoint(ckpt: Path) -> None:
    """A megatron dist checkpoint in the torch_dist format."""
    metadata = ckpt / DIST_CHECKPOINT_METADATA
    if not metadata.is_file():
        hint = "; a training run's checkpoints folder: pass one of its step_N folders" if any(ckpt.glob("step_*")) else ""
        raise ConversionError(f"{ckpt}: no {DIST_CHECKPOINT_METADATA} (expected a megatron dist checkpoint){hint}")
    backend = json.loads(metadata.read_text(encoding="utf-8")).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{metadata}: sharded_backend: expected 'torch_dist', got {backend!r}")
