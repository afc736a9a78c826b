"""`opsdc convert`: HF <-> Megatron for every architecture at TP=2 and PP=2, verify, and bad input.

The megatron-side checks share one 2-process launch (tests/workers/convert_worker.py); this file
then compares the exported folders with the sources bit for bit and loads them in transformers.
The command-line tests run `opsdc convert` itself (hf-to-megatron starts its own torchrun).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.convert.checks import check_hf_folder
from opsdc_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from opsdc_megatron.convert.verify import LogitDifference
from opsdc_megatron.models.layer_spec import gpt_decoder_spec
from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict, load_hf_weights
from opsdc_megatron.parallel import destroy_distributed, init_distributed
from opsdc_megatron.prompts import write_prompts
from opsdc_megatron.toy.task import toy_prompts
from opsdc_megatron.train.checkpoint import load_model_weights
from tests.launch import run_opsdc, torchrun
from tests.tiny_models import SHARDED_INPUT, TINY_MODELS, VOCAB, save_tiny_model

pytestmark = pytest.mark.convert

LAYOUTS = ("tp2", "pp2")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("convert") / "hf"
    for name in TINY_MODELS:
        save_tiny_model(name, root / name)
    save_tiny_model("qwen3_tied", root / "qwen3_tied_other_seed", seed=99)
    return root


def safetensors_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `opsdc convert ...` run in this process."""
    status, out, err = run_opsdc(capsys, "convert", *argv)
    return status, out + err


def test_round_trip_at_tp2_and_pp2_is_bitwise_and_logits_agree(hf_models: Path) -> None:
    work = hf_models.parent
    output = torchrun("convert_worker.py", 2, str(work))
    assert "CONVERT OK" in output, output[-3000:]
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for name in TINY_MODELS:
        source_folder = hf_models / name
        source = safetensors_state(source_folder)
        if TINY_MODELS[name][1].tie_word_embeddings:
            source.pop("lm_head.weight", None)
        for layout in LAYOUTS:
            exported = work / "export" / f"{name}_{layout}"
            files = sorted(p.name for p in exported.glob("*.safetensors"))
            index = json.loads((exported / "model.safetensors.index.json").read_text())
            assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files, (name, layout, files)
            for side_file in SIDE_FILES:
                assert (exported / side_file).read_bytes() == (source_folder / side_file).read_bytes(), (name, layout, side_file)
            state = safetensors_state(exported)
            assert state.keys() == source.keys(), (name, layout, sorted(state.keys() ^ source.keys()))
            unequal = [key for key in source if state[key].dtype != source[key].dtype or not torch.equal(state[key], source[key])]
            assert not unequal, f"{name} {layout}: not bitwise identical: {unequal}"
            assert torch.equal(logits(exported, tokens), logits(source_folder, tokens)), (name, layout)


def test_a_cli_error_is_one_line_not_the_end_of_megatrons_import_notes(tmp_path: Path) -> None:
    """Without Transformer Engine and apex (CPU machines) megatron-core's import printed 12 warnings before the error."""
    proc = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "convert", "megatron-to-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[-1] == f"opsdc convert megatron-to-hf: error: {tmp_path / 'nope'}: no metadata.json (expected a megatron dist checkpoint)"
    # (a CUDA build of torch on a CPU machine, the py312 line's, logs one line of its own: "No CUDA runtime is found")
    assert not [line for line in lines if "Apex" in line or "Transformer Engine" in line], lines


def test_cli_converts_verifies_and_names_bad_checkpoints(hf_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = hf_models / "qwen2"
    ckpt, exported = tmp_path / "qwen2_megatron", tmp_path / "qwen2_hf"
    status, output = run_cli(capsys, "hf-to-megatron", "--hf", str(source), "--out", str(ckpt))
    assert status == 0 and "wrote" in output, output[-3000:]
    assert json.loads((ckpt / "conversion.json").read_text())["tensor_parallel_size"] == 1
    status, output = run_cli(capsys, "verify", "--hf", str(source), "--ckpt", str(ckpt))
    assert status == 0 and ": OK" in output, output[-3000:]
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(exported), "--dtype", "bf16")
    assert status == 0, output[-3000:]
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    state, original = safetensors_state(exported), safetensors_state(source)
    assert all(state[key].dtype == torch.bfloat16 and torch.equal(state[key], original[key].bfloat16()) for key in original)

    # verify fails (exit 1) on a model the checkpoint was not made from
    other = tmp_path / "qwen2_other"
    save_tiny_model("qwen2", other, seed=7)
    status, output = run_cli(capsys, "verify", "--hf", str(other), "--ckpt", str(ckpt))
    assert status == 1 and ": FAIL" in output, output[-3000:]

    # ... and passes a correct conversion of a model with large logits, whose kernels' difference is larger
    # in absolute terms (a trained model's logits of 20-40 differ by a few 1e-5, beyond the old absolute 1e-5)
    # (the tiny models' logits agree exactly; head_dim 128 and a wider MLP make the kernels differ)
    torch.manual_seed(0)
    large = Qwen3ForCausalLM(Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=128, max_position_embeddings=64, tie_word_embeddings=False))
    with torch.no_grad():
        large.model.norm.weight.mul_(30.0)  # logits of about 40, as a trained model's
    large.save_pretrained(tmp_path / "qwen3_large")
    status, output = run_cli(capsys, "hf-to-megatron", "--hf", str(tmp_path / "qwen3_large"), "--out", str(tmp_path / "qwen3_large_megatron"))
    assert status == 0, output[-3000:]
    status, output = run_cli(capsys, "verify", "--hf", str(tmp_path / "qwen3_large"), "--ckpt", str(tmp_path / "qwen3_large_megatron"))
    assert status == 0 and ": OK" in output, output[-3000:]
    # How far the kernels differ depends on the CPU: by more than the old absolute 1e-5 on the AMD EPYC machines this ran
    # on until 2026-11-29, exactly 0 on an Intel Xeon with AMX (the same day). The verdict is relative to the largest logit:
    assert LogitDifference(largest=3e-5, largest_logit=45.2).relative <= 1e-5  # what the EPYC machines measured passes

    # `opsdc train` starts from the converted checkpoint, not from model.hf_path's weights: with lr=0
    # the final export equals the converted model bit for bit, though hf_path holds another model
    write_prompts(tmp_path / "prompts.jsonl", toy_prompts(0, 4, "train"))
    run = tmp_path / "run"
    overrides = [
        f"out_dir={run}", f"model.hf_path={other}", f"model.megatron_checkpoint={ckpt}", f"data.train_prompts={tmp_path / 'prompts.jsonl'}",
        "parallel.tensor_parallel_size=1", "train.steps=1", "train.lr=0.0", "train.global_batch_prompts=4",
        "rollout.max_response_tokens=8", "rollout.generation_batch_prompts=4", "eval.every_steps=0",
    ]
    trained = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *overrides], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-6000:]
    final = safetensors_state(run / "final_hf")
    assert all(torch.equal(final[key], original[key]) for key in original)

    # a config of another architecture, a folder that is no checkpoint, an unreadable checkpoint
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out_mismatch"), "--hf-config", str(hf_models / "qwen3_untied"))
    assert status == 2 and "does not match" in output and "q_layernorm" in output, output[-3000:]
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(source), "--out", str(tmp_path / "out_not_ckpt"), "--hf-config", str(source))
    assert status == 2 and "no metadata.json (expected a megatron dist checkpoint)" in output, output[-3000:]
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    next(broken.glob("*.distcp")).unlink()
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(broken), "--out", str(tmp_path / "out_broken"))
    assert status == 1 and "reading the checkpoint failed" in output, output[-3000:]
    assert ".distcp" in output and "Traceback" not in output, output[-3000:]  # the first rank's error, not every rank's traceback
    # --hf-config names config.json itself, not the model's folder (whose tokenizer files are copied too):
    # refused before any shard is written (it failed after writing them all, naming a temporary path)
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out_config_file"),
                             "--hf-config", str(source / "config.json"))
    assert status == 2 and "config.json: not a folder with a config.json; --hf-config takes" in output, output[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if "out_" in p.name]  # no output, no temporary folder
    status, output = run_cli(capsys, "hf-to-megatron", "--hf", str(source), "--out", str(tmp_path / "out_vp"), "--vp", "0")
    assert status == 2 and "--vp: the virtual pipeline size must be at least 1, got 0" in output, output[-3000:]
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out_shards"), "--max-shard-gb", "0")
    assert status == 2 and "--max-shard-gb must be > 0, got 0.0" in output, output[-3000:]  # wrote one file per tensor
    status, output = run_cli(capsys, "verify", "--hf", str(source), "--ckpt", str(ckpt), "--tokens", "0")
    assert status == 2 and "--tokens must be >= 1, got 0" in output, output[-3000:]  # exit 1, the status of differing logits
    # a run's checkpoints folder: named as such (the config lookup's error asked for --hf-config)
    (tmp_path / "run_checkpoints" / "step_000002").mkdir(parents=True)
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(tmp_path / "run_checkpoints"), "--out", str(tmp_path / "out_run"))
    assert status == 2 and "a training run's checkpoints folder: pass one of its step_N folders" in output, output[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if "out_" in p.name]


def test_an_unreadable_padded_vocabulary_is_named(hf_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """At TP=2 the odd vocabulary (175) is padded to 176 rows, which the export reads to check they are zero:
    a checkpoint missing the second rank's file fails there with the named error (it was a traceback)."""
    ckpt = tmp_path / "qwen2_tp2"
    status, output = run_cli(capsys, "hf-to-megatron", "--hf", str(hf_models / "qwen2"), "--out", str(ckpt), "--tp", "2")
    assert status == 0, output[-3000:]
    (ckpt / "__1_0.distcp").unlink()
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--hf-config", str(hf_models / "qwen2"))
    assert status == 1 and f"failed: {ckpt}: reading the checkpoint failed" in output, output[-3000:]
    assert "__1_0.distcp" in output and "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tp1_checkpoint(hf_models: Path) -> Callable[[str], Path]:
    """A tiny model converted at TP=1 once per module, for tests that only read it (a conversion is a torchrun: ~13 s)."""
    converted: dict[str, Path] = {}

    def checkpoint(name: str) -> Path:
        if name not in converted:
            converted[name] = convert_hf_to_megatron(hf_models / name, hf_models.parent / f"{name}_megatron", 1, 1)
        return converted[name]

    return checkpoint


@pytest.mark.parametrize(
    ("config_change", "message"),
    [
        ({"tie_word_embeddings": True}, r"output_layer\.weight"),
        ({"vocab_size": 150}, r"a larger vocabulary than the config's 150 tokens \(embedding\.word_embeddings\.weight has 175 rows, output_layer\.weight has 175 rows"),
        ({"vocab_size": 200}, r"has 175 rows, fewer than the config's vocabulary of 200 tokens|config implies \(200, 64\), checkpoint has \(175, 64\)"),
        # the same tensors with other shapes: torch's CheckpointException (a BaseException) got past the load's handler
        ({"intermediate_size": 128}, r"linear_fc\d\.weight: config implies .* checkpoint has|Global shape mismatch .*linear_fc\d\.weight"),
    ],
    ids=["tied-config-untied-checkpoint", "smaller-vocabulary", "larger-vocabulary", "other-shapes"],
)
def test_a_checkpoint_of_another_model_is_refused_not_cut(
    hf_models: Path, tp1_checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture, config_change: dict, message: str
) -> None:
    """Checkpoint tensors the config has no place for (a trained output layer under a tied config,
    vocabulary rows past the config's) stop export and `opsdc train`'s load instead of being dropped."""
    from opsdc_megatron.models.qwen3.model import build_gpt_model

    ckpt, config_dir = tp1_checkpoint("qwen2"), tmp_path / "other_config"
    shutil.copytree(hf_models / "qwen2", config_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = json.loads((config_dir / "config.json").read_text())
    (config_dir / "config.json").write_text(json.dumps({**config, **config_change}))
    status, output = run_cli(capsys, "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--hf-config", str(config_dir))
    assert status == 2 and re.search(message, output), output[-3000:]
    assert not (tmp_path / "out").exists()
    init_distributed(1, 1)
    try:
        with pytest.raises(ValueError, match=message):
            load_model_weights(ckpt, [build_gpt_model(config_dir, 1, 1)])
    finally:
        destroy_distributed()
    if "intermediate_size" in config_change:  # verify loads the same way: bad input (2), not logits that differ (1)
        from transformers import AutoConfig

        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(config_dir)
        status, output = run_cli(capsys, "verify", "--hf", str(config_dir), "--ckpt", str(ckpt))
        assert status == 2 and "not a checkpoint of this model config: Global shape mismatch" in output, output[-3000:]


def _missing_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[1].unlink()


def _truncated_shard(folder: Path) -> None:
    """What an interrupted download leaves."""
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _mismatched_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))


def _float64_weights(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        save_file({name: tensor.double() for name, tensor in load_file(file).items()}, str(file), metadata={"format": "pt"})


def test_saved_rope_tables_pass_the_input_check(hf_models: Path, tmp_path: Path) -> None:
    """Older transformers saved the non-persistent RoPE buffer; loading ignores it, and so do we."""
    folder = tmp_path / "source"
    shutil.copytree(hf_models / SHARDED_INPUT, folder)
    first = sorted(folder.glob("model-*.safetensors"))[0]
    state = load_file(first) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    save_file(state, str(first), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = first.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_hf_folder(folder).config.num_hidden_layers == 2


def _unsupported_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))


@pytest.mark.parametrize(
    ("break_input", "extra_args", "message"),
    [
        (_missing_shard, [], r"model.safetensors.index.json: weight shards missing from .*: \['model-00002-of-00009.safetensors'\]"),
        (_truncated_shard, [], r"model-00002-of-00009.safetensors: not a readable safetensors file \(.*incomplete metadata"),
        (_mismatched_config, [], r"config.json does not match the weights:\n  mis-shaped: \['model.layers.0.mlp.down_proj.weight: config implies \(64, 128\), file has \(64, 96\)'"),
        (_unsupported_architecture, [], r"architectures: expected one of \['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\], got \['MistralForCausalLM'\]"),
        (None, ["--tp", "3"], r"num_attention_heads: expected a multiple of tensor_parallel_size = 3, got 4"),
        (None, ["--pp", "2", "--vp", "2"], r"num_hidden_layers: expected a multiple of pipeline x virtual pipeline size = 4, got 2"),
        (None, ["--vp", "2"], r"--vp 2 needs pipeline parallelism \(--pp > 1\), got --pp 1"),
        (None, ["--tp", "0"], r"tensor_parallel_size: expected >= 1, got 0"),
        (_float64_weights, [], r"model.embed_tokens.weight is stored as F64; expected one of \['BF16', 'F16', 'F32'\]"),
        ("exists", [], r"output folder exists"),
    ],
    ids=[
        "missing-shard", "truncated-shard", "config-mismatch", "unsupported-architecture", "tp-not-dividing-heads", "vp-not-dividing-layers",
        "vp-without-pp", "tp-zero", "float64-weights", "output-exists",
    ],
)
def test_bad_input_is_named_and_writes_nothing(hf_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture, break_input, extra_args: list[str], message: str) -> None:
    source = tmp_path / "source"
    shutil.copytree(hf_models / SHARDED_INPUT, source)
    out = tmp_path / "out"
    if break_input == "exists":
        out.mkdir()
    elif break_input is not None:
        break_input(source)
    before = sorted(tmp_path.iterdir())
    status, output = run_cli(capsys, "hf-to-megatron", "--hf", str(source), "--out", str(out), *extra_args)
    assert status == 2, output[-3000:]
    assert re.search(message, output), output[-3000:]
    assert sorted(tmp_path.iterdir()) == before


def test_hf_to_megatron_streams_with_peak_memory_near_the_largest_tensor(tmp_path: Path) -> None:
    """One rank converts a model over 5x its largest tensor (the embedding) in under 2.5x that tensor.

    Peak resident memory of the save over what the process held before it (VmHWM, in a fresh
    process: tests/workers/convert_memory_worker.py). Holding the rank's whole shard, or keeping
    the input files mapped, takes more than 5x (11.7x before the converter streamed).
    """
    config = Qwen3Config(
        vocab_size=32768, hidden_size=256, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"],
    )
    hf, out = tmp_path / "hf", tmp_path / "megatron"
    Qwen3ForCausalLM(config).save_pretrained(hf)
    tensor_bytes = [tensor.numel() * tensor.element_size() for tensor in safetensors_state(hf).values()]
    largest, total = max(tensor_bytes), sum(tensor_bytes)
    assert largest == config.vocab_size * config.hidden_size * 4 and total > 5 * largest
    out.mkdir()
    worker = Path(__file__).parent / "workers" / "convert_memory_worker.py"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(worker), str(hf), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    growth = int(re.search(r"PEAK GROWTH (\d+)", result.stdout).group(1))
    assert sum(file.stat().st_size for file in out.glob("*.distcp")) > total  # the model was written
    assert growth < 2.5 * largest, f"peak memory grew {growth / largest:.2f}x the largest tensor ({growth / 1e6:.0f} MB; model {total / 1e6:.0f} MB)"


class _NormedColumnParallelLinear(ColumnParallelLinear):
    """Stand-in for Transformer Engine's TELayerNormColumnParallelLinear, which cannot be installed
    here: the layer's RMSNorm runs first and its weight is a parameter of the layer,
    ``layer_norm_weight``, as in TE's layer."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
        self.eps = config.layernorm_epsilon

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        normed = torch.nn.functional.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(normed, *args, **kwargs)


class _NormWithExtraState(torch.nn.Module):
    """Stand-in for Transformer Engine's RMSNorm (QK-norms, final norm): the same weight, and the
    `_extra_state` every TE module keeps (FP8 metadata), which a local layer's checkpoint lacks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(input_, (input_.shape[-1],), self.weight, self.eps)

    def get_extra_state(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        pass


def _te_named_decoder_spec(attention_backend: str, qk_layernorm: bool, config, vp_stage=None) -> ModuleSpec:
    """The local decoder with its pre-norms fused into linear_qkv and linear_fc1, named as Transformer
    Engine's layer names them (what `gpt_layer_spec` builds wherever TE imports), and norms that keep
    extra state as TE's do."""
    block = gpt_decoder_spec("local", qk_layernorm, config, vp_stage)
    block.submodules.layer_norm = _NormWithExtraState
    layer = copy.deepcopy(block.submodules.layer_specs[0])
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = IdentityOp
    if qk_layernorm:
        layer.submodules.self_attention.submodules.q_layernorm = layer.submodules.self_attention.submodules.k_layernorm = _NormWithExtraState
    layer.submodules.self_attention.submodules.linear_qkv = _NormedColumnParallelLinear
    mlp = layer.submodules.mlp  # megatron-core 0.19 wraps the MLP's spec in a functools.partial
    (mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules).linear_fc1 = _NormedColumnParallelLinear
    layer.submodules.sharded_state_dict_keys_map = {}
    block.submodules.layer_specs = [layer] * len(block.submodules.layer_specs)
    return block


@pytest.mark.parametrize("name", ["qwen3_untied", "qwen2", "llama3"])
def test_transformer_engine_layer_names_load_export_and_share_checkpoints(
    hf_models: Path, tp1_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """With Transformer Engine's layer the pre-norm weights are ``linear_qkv.layer_norm_weight`` and
    ``linear_fc1.layer_norm_weight``: HF weights load into them (same logits as transformers), export
    back unchanged, and a checkpoint converted with the local layer loads into them."""
    from opsdc_megatron.models.qwen3 import model as model_module

    source, ckpt = hf_models / name, tp1_checkpoint(name)
    monkeypatch.setattr(model_module, "gpt_decoder_spec", _te_named_decoder_spec)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand_as(tokens)
    init_distributed(1, 1)
    try:
        from_hf = model_module.build_gpt_model(source, 1, 1)
        fused_norms = [n for n, _ in from_hf.named_parameters() if n.endswith("layer_norm_weight")]
        assert len(fused_norms) == 2 * TINY_MODELS[name][1].num_hidden_layers, fused_norms
        load_hf_weights(from_hf, source)
        exported = export_hf_state_dict(from_hf)
        from_ckpt = model_module.build_gpt_model(source, 1, 1)
        load_model_weights(ckpt, [from_ckpt])
        with torch.no_grad():
            megatron_logits = [m.eval()(tokens, positions, None)[..., :VOCAB] for m in (from_hf, from_ckpt)]
    finally:
        destroy_distributed()
    original = safetensors_state(source)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    expected = logits(source, tokens)
    for megatron in megatron_logits:
        torch.testing.assert_close(megatron, expected, rtol=1e-4, atol=1e-4)


def test_tensors_stored_in_another_dtype_than_the_embedding_are_named(hf_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """bf16 weights with fp32 norms: megatron keeps one params dtype (the embedding's), so the norms are
    rounded to bf16 by the conversion; that is said, not done silently."""
    model = AutoModelForCausalLM.from_pretrained(hf_models / "qwen3_untied", dtype=torch.float32)
    for name, parameter in model.named_parameters():
        if "norm" not in name:
            parameter.data = parameter.data.bfloat16()
    model.save_pretrained(tmp_path / "mixed")
    with pytest.warns(UserWarning, match=r"\d+ tensor\(s\) stored in another dtype than the embedding's torch.bfloat16 "
                      r"\(e.g. model.layers.0.input_layernorm.weight: torch.float32\) are converted to torch.bfloat16"):
        status, output = run_cli(capsys, "hf-to-megatron", "--hf", str(tmp_path / "mixed"), "--out", str(tmp_path / "ckpt"))
    assert status == 0, output[-3000:]
