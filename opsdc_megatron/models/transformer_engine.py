"""Transformer Engine: used whenever it imports, reported when it is broken, required only for FP8.

Two facts shape this module (FACTS.md section 2):

* megatron-core imports Transformer Engine at module level and catches only ``ImportError``. A
  broken install (TE's CUDA wheels without its torch extension: ``AssertionError`` or "cudnn shared
  object not found"; an empty ``transformer_engine/`` folder left by an uninstall) therefore makes
  ``import megatron.core`` itself crash. ``guard_broken_transformer_engine`` (run when
  ``opsdc_megatron`` is imported, before any megatron import) imports TE once; if that raises
  anything, it records the error, warns with it, and blocks the module (``sys.modules[...] = None``)
  so that megatron's own ``import transformer_engine`` raises the ``ImportError`` it handles. The
  run then continues on the local spec, and FP8, which needs TE, fails with the recorded error.
* FP8 is a property of the TE layers only: the output layer (a plain ColumnParallelLinear in
  GPTModel) and the reverse KL stay in bf16/fp32.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")

_TE_MODULES = ("transformer_engine", "transformer_engine.pytorch")


@dataclass(frozen=True)
class TransformerEngineStatus:
    available: bool
    reason: str
    """Why it is not available: not installed, or the error its import raised."""


_status: TransformerEngineStatus | None = None


def guard_broken_transformer_engine() -> TransformerEngineStatus:
    """Import Transformer Engine once; block it for megatron if the import fails in any way."""
    global _status
    if _status is not None:
        return _status
    if importlib.util.find_spec("transformer_engine") is None:
        _status = TransformerEngineStatus(False, "transformer_engine is not installed")
        return _status
    try:
        for name in _TE_MODULES:
            importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any failure here would crash megatron's import
        reason = f"transformer_engine is installed but does not import: {type(error).__name__}: {error}"
        for name in list(sys.modules):
            if name == "transformer_engine" or name.startswith("transformer_engine."):
                del sys.modules[name]
        for name in _TE_MODULES:
            sys.modules[name] = None  # makes `import transformer_engine` raise ImportError
        warnings.warn(f"{reason}; running without it (megatron-core's local layer spec, no FP8)", stacklevel=2)
        _status = TransformerEngineStatus(False, reason)
        return _status
    _status = TransformerEngineStatus(True, "")
    return _status


@dataclass
class FP8Config:
    """FP8 training through Transformer Engine (off unless ``format`` is set)."""

    format: str | None = None
    """hybrid (E4M3 forward, E5M2 gradients) or e4m3; null = bf16 training."""
    recipe: str = "delayed"
    """Scaling recipe: delayed, tensorwise or blockwise (blockwise needs Hopper and TE >= 2.3)."""
    param_gather: bool = False
    """Keep parameters in FP8 and all-gather them in FP8 (distributed optimizer)."""


def check_fp8(fp8: FP8Config) -> None:
    """Named errors for an FP8 request that cannot run; nothing to check when FP8 is off."""
    if fp8.format is None:
        return
    if fp8.format not in FP8_FORMATS:
        raise ValueError(f"model.fp8.format: expected one of {FP8_FORMATS} or null, got {fp8.format!r}")
    if fp8.recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8.recipe: expected one of {FP8_RECIPES}, got {fp8.recipe!r}")
    status = guard_broken_transformer_engine()
    if not status.available:
        raise ValueError(f"model.fp8.format={fp8.format!r} needs Transformer Engine: {status.reason}")


def fp8_token_multiple(fp8: FP8Config) -> int:
    """What each micro-batch stream's token count must be a multiple of (distill/batch.py): Transformer
    Engine's FP8 GEMMs take [tokens, hidden] inputs with tokens divisible by megatron's alignment for
    the recipe (16 for these); 1 when FP8 is off. Variable-length rollouts rarely are."""
    if fp8.format is None:
        return 1
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    return get_fp8_align_size(Fp8Recipe(fp8.recipe))


def fp8_transformer_config_fields(fp8: FP8Config) -> dict[str, object]:
    """The TransformerConfig fields for ``fp8`` (empty when FP8 is off).

    FP8 scaling factors are reduced over the tensor-parallel group only (``tp_only_amax_red``).
    megatron's default also reduces over data parallelism, one collective per FP8 forward. Each
    data-parallel rank packs its own rollouts into micro-batches, so the ranks may run different
    numbers of them, and a rank that finishes first waits in the gradient all-reduce while the
    others wait in an amax reduction: a hang.
    """
    check_fp8(fp8)
    if fp8.format is None:
        return {}
    return {"fp8": fp8.format, "fp8_recipe": fp8.recipe, "fp8_param": fp8.param_gather, "tp_only_amax_red": True}


def keep_as_fp8_initial_value(param, value) -> None:
    """Loaded weights into Transformer Engine's high-precision copy of an FP8 parameter's initial value.

    With `model.fp8.param_gather`, megatron builds the layers under TE's `fp8_model_init(preserve_high_precision_init_val=True)`,
    and its distributed optimizer takes the fp32 main weights from that copy (`get_high_precision_init_val`), not from
    the FP8 parameter. Weights loaded after the build (Hugging Face or torch_dist) reach only the parameter, so the first
    optimizer step would write the random initial values back into the model. No-op for other parameters.
    """
    kept = param.get_high_precision_init_val() if hasattr(param, "get_high_precision_init_val") else None
    if kept is not None:
        kept.copy_(value)
