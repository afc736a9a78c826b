"""`opsdc convert`: HF <-> Megatron for every architecture at TP=2 and PP=2, verify, and bad input.

The megatron-side checks share one 2-process launch (tests/workers/convert_worker.py); this file
then compares the exported folders with the sources bit for bit and loads them in transformers.
The command-line tests run `opsdc convert` itself (hf-to-megatron starts its own torchrun).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.cli import main
from opsdc_megatron.prompts import write_prompts
from opsdc_megatron.toy.task import toy_prompts
from tests.launch import torchrun
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
    try:
        main(["convert", *argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out + captured.err


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
    assert not [p.name for p in tmp_path.iterdir() if "out_" in p.name]  # no output, no temporary folder


def _missing_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[1].unlink()


def _mismatched_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))


def _unsupported_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))


@pytest.mark.parametrize(
    ("break_input", "extra_args", "message"),
    [
        (_missing_shard, [], r"model.safetensors.index.json: weight shards missing from .*: \['model-00002-of-00009.safetensors'\]"),
        (_mismatched_config, [], r"config.json does not match the weights:\n  mis-shaped: \['model.layers.0.mlp.down_proj.weight: config implies \(64, 128\), file has \(64, 96\)'"),
        (_unsupported_architecture, [], r"architectures: expected one of \['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\], got \['MistralForCausalLM'\]"),
        (None, ["--tp", "3"], r"num_attention_heads: expected a multiple of tensor_parallel_size = 3, got 4"),
        (None, ["--pp", "2", "--vp", "2"], r"num_hidden_layers: expected a multiple of pipeline x virtual pipeline size = 4, got 2"),
        ("exists", [], r"output folder exists"),
    ],
    ids=["missing-shard", "config-mismatch", "unsupported-architecture", "tp-not-dividing-heads", "vp-not-dividing-layers", "output-exists"],
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
