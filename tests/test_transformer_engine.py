"""Transformer Engine on machines without a working one (these CPUs): a broken install must not
crash `import megatron.core` once opsdc_megatron is imported; FP8 without TE is a named error.

A broken TE is made for real: a `transformer_engine` package on PYTHONPATH whose import raises what
a CUDA-only TE wheel raises here (FACTS.md section 2), or an empty leftover folder. Each case runs
in a fresh interpreter. The FP8 path itself needs a GPU with TE: tests/gpu/test_fp8_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsdc_megatron.config import ConfigError, load_config
from opsdc_megatron.models.transformer_engine import FP8Config, check_fp8, guard_broken_transformer_engine


ROOT = Path(__file__).resolve().parents[1]
BUILD_MODEL = """
import warnings
warnings.simplefilter("always")
{first_import}
from megatron.core.models.gpt import GPTModel
from opsdc_megatron.models.layer_spec import gpt_layer_spec
from opsdc_megatron.models.sdpa_attention import SDPAttention
from opsdc_megatron.models.transformer_engine import FP8Config, check_fp8, guard_broken_transformer_engine
spec = gpt_layer_spec("sdpa")
assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
assert gpt_layer_spec("auto").submodules.self_attention.submodules.core_attention is not SDPAttention  # CPU: local
try:
    check_fp8(FP8Config(format="hybrid"))
except ValueError as error:
    print("FP8 ERROR:", error)
try:
    gpt_layer_spec("te")
except ValueError as error:
    print("TE SPEC ERROR:", error)
print("BUILT")
"""


def _broken_te(root: Path, kind: str) -> Path:
    package = root / kind / "transformer_engine"
    package.mkdir(parents=True)
    if kind == "raises":
        (package / "__init__.py").write_text('raise AssertionError("cudnn shared object not found")\n')
    return root / kind  # "empty": a leftover folder without __init__.py (a namespace package)


def _run(code: str, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{pythonpath}{os.pathsep}{ROOT}", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("kind", ["raises", "empty"])
def test_broken_transformer_engine_is_reported_not_fatal(tmp_path: Path, kind: str) -> None:
    broken = _broken_te(tmp_path, kind)
    unguarded = _run("import megatron.core.models.gpt", broken)
    assert unguarded.returncode != 0, "megatron-core now survives a broken TE by itself; the guard may go"
    guarded = _run(BUILD_MODEL.format(first_import="import opsdc_megatron"), broken)
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    assert "BUILT" in guarded.stdout
    assert "transformer_engine is installed but does not import" in guarded.stderr
    assert "FP8 ERROR: model.fp8.format='hybrid' needs Transformer Engine: transformer_engine is installed but does not import" in guarded.stdout
    assert "TE SPEC ERROR: attention backend 'te' needs Transformer Engine" in guarded.stdout


@pytest.mark.skipif(guard_broken_transformer_engine().available, reason="Transformer Engine is installed here: FP8 is no error")
def test_fp8_without_transformer_engine_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.fp8.format='hybrid' needs Transformer Engine: transformer_engine is not installed"):
        load_config(ROOT / "recipes" / "toy_cpu.yaml", ["model.hf_path=x", "out_dir=x", "data.train_prompts=x", "model.fp8.format=hybrid"])
    with pytest.raises(ConfigError, match="model.fp8.recipe: expected one of"):
        load_config(ROOT / "recipes" / "toy_cpu.yaml", ["model.hf_path=x", "out_dir=x", "data.train_prompts=x", "model.fp8.format=e4m3", "model.fp8.recipe=mxfp9"])
    with pytest.raises(ConfigError, match="model.attention_backend must be"):
        load_config(ROOT / "recipes" / "toy_cpu.yaml", ["model.hf_path=x", "out_dir=x", "data.train_prompts=x", "model.attention_backend=flash"])
    check_fp8(FP8Config())  # off: nothing to check


def test_fp8_token_multiple_follows_megatron_alignment() -> None:
    """Micro-batch streams are padded to it (distill/batch.py): 16 for every recipe we offer, 1 without FP8."""
    from opsdc_megatron.models.transformer_engine import FP8_RECIPES, FP8Config, fp8_token_multiple

    assert fp8_token_multiple(FP8Config()) == 1
    assert {fp8_token_multiple(FP8Config(format="hybrid", recipe=recipe)) for recipe in FP8_RECIPES} == {16}


def _attach_fp8_initial_value_copy(param) -> None:
    """What Transformer Engine's `fp8_model_init(preserve_high_precision_init_val=True)` gives each FP8
    parameter (with `model.fp8.param_gather`), stood in for because TE cannot be installed here: a
    high-precision copy of its random initial value and a getter, from which megatron's distributed
    optimizer takes its fp32 main weights."""
    param._high_precision_init_val = torch.randn_like(param.detach())
    param.get_high_precision_init_val = lambda: param._high_precision_init_val


def test_loaded_weights_reach_the_fp8_parameters_initial_value_copy(one_rank, tmp_path: Path) -> None:
    """Hugging Face and torch_dist loads write the copy too: left random, the first optimizer step of a
    param_gather run would put the random initial weights back into the model."""
    from megatron.core import dist_checkpointing

    from opsdc_megatron.models.hf_config import load_hf_config
    from opsdc_megatron.models.qwen3.model import build_gpt_model
    from opsdc_megatron.models.qwen3.state_dict_adapter import load_hf_weights
    from opsdc_megatron.torch_dist_save import InProcessTorchDistSave
    from opsdc_megatron.train.checkpoint import load_model_weights
    from tests.tiny_models import save_tiny_model

    hf = save_tiny_model("qwen3_untied", tmp_path / "hf")
    model = build_gpt_model(load_hf_config(hf), 1)
    params = dict(model.named_parameters())
    watched = [params[name] for name in ("decoder.layers.0.self_attention.linear_qkv.weight", "output_layer.weight")]
    for param in watched:
        _attach_fp8_initial_value_copy(param)
    load_hf_weights(model, hf)
    assert all(torch.equal(param.get_high_precision_init_val(), param.detach()) for param in watched)

    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "ckpt"), sharded_strategy=InProcessTorchDistSave())
    for param in watched:
        _attach_fp8_initial_value_copy(param)
    load_model_weights(tmp_path / "ckpt", [model])
    assert all(torch.equal(param.get_high_precision_init_val(), param.detach()) for param in watched)


def test_fp8_parameters_tell_the_distributed_optimizer_to_gather_fp8(one_rank, tmp_path: Path) -> None:
    """With model.fp8.param_gather the GEMM weights are FP8 parameters, into which megatron-core 0.19's
    distributed optimizer writes its updated main weights only when DDP was told (fp8_param_gather, as
    Megatron-LM's --fp8-param-gather does): without it those weights never changed. The model's config
    says so (fp8_param); FP8 itself needs a GPU with TE, so its flags are set on a bf16 CPU model here."""
    from opsdc_megatron.config import ParallelConfig, TrainConfig
    from opsdc_megatron.models.hf_config import load_hf_config
    from opsdc_megatron.models.qwen3.model import build_gpt_model
    from opsdc_megatron.train.step import wrap_for_training
    from tests.tiny_models import save_tiny_model

    model = build_gpt_model(load_hf_config(save_tiny_model("qwen3_untied", tmp_path / "hf")), 1)
    model.config.fp8, model.config.fp8_recipe, model.config.fp8_param = "hybrid", "delayed", True
    ddps, optimizer = wrap_for_training([model], TrainConfig(), ParallelConfig(distributed_optimizer=True))
    assert ddps[0].ddp_config.fp8_param_gather and optimizer.config.fp8_recipe == "delayed"


def test_fp8_with_megatrons_own_layers_is_a_config_error(monkeypatch) -> None:
    """sdpa and local build megatron's own linear layers, which FP8 autocast leaves in bf16: the run paid FP8's
    padding and logged fp8 while computing in bf16. Where TE is available (stood in for here)."""
    from opsdc_megatron.models import transformer_engine

    monkeypatch.setattr(transformer_engine, "guard_broken_transformer_engine", lambda: transformer_engine.TransformerEngineStatus(True, ""))
    base = ["model.hf_path=x", "out_dir=x", "data.train_prompts=x", "model.fp8.format=hybrid"]
    for backend in ("sdpa", "local"):
        with pytest.raises(ConfigError, match=f"model.attention_backend must be te or auto, got '{backend}'"):
            load_config(ROOT / "recipes" / "toy_cpu.yaml", [*base, f"model.attention_backend={backend}"])
