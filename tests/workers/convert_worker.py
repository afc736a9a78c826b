"""HF <-> Megatron conversion of every tiny architecture at TP=2 and at PP=2, in one 2-process launch.

Usage: torchrun --nproc-per-node=2 convert_worker.py WORK_DIR

WORK_DIR/hf/<name> holds the tiny HF models (tests/tiny_models.py). For each:
  1. `save_megatron_checkpoint` at TP=2 (PP=1) and at PP=2 (TP=1) -> WORK_DIR/megatron/<name>_{tp2,pp2}
     (see CONVERSIONS);
  2. rank 0 exports each checkpoint with `export_megatron_to_hf` (small shards) -> WORK_DIR/export/...;
     the test process then compares them with the source bit for bit and loads them in transformers;
  3. `logit_difference` (megatron TP=1 vs transformers, fp32) <= 1e-5, and > 1e-2 against a
     different model of the same shapes (the check can fail);
  4. `load_model_weights` (what `opsdc train` uses with model.megatron_checkpoint) of the last
     checkpoint of each model (PP=2 where there is one) into a TP=2 model, then
     `export_hf_state_dict`: the source tensors bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opsdc_megatron.convert.hf_to_megatron import HF_FILES, copy_hf_files, save_megatron_checkpoint  # noqa: E402
from opsdc_megatron.convert.megatron_to_hf import export_megatron_to_hf  # noqa: E402
from opsdc_megatron.convert.verify import logit_difference  # noqa: E402
from opsdc_megatron.models.qwen3.model import build_gpt_model  # noqa: E402
from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict  # noqa: E402
from opsdc_megatron.parallel import destroy_distributed, init_distributed  # noqa: E402
from opsdc_megatron.train.checkpoint import load_model_weights  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tests.tiny_models import TINY_MODELS  # noqa: E402

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}
CONVERSIONS = [(name, layout) for name in TINY_MODELS for layout in LAYOUTS]
TOLERANCE = 1e-5
SHARD_BYTES = 64 * 1024  # several output files per tiny model


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def main(work: Path) -> None:
    hf, megatron, export = work / "hf", work / "megatron", work / "export"
    init_distributed(1, 1)  # the default process group; layouts below re-create megatron's groups
    parallel_state.destroy_model_parallel()
    rank0 = dist.get_rank() == 0
    for name, layout in CONVERSIONS:
        tp, pp = LAYOUTS[layout]
        ckpt = megatron / f"{name}_{layout}"
        if rank0:
            ckpt.mkdir(parents=True)
            copy_hf_files(hf / name, ckpt / HF_FILES)
        dist.barrier()
        init_distributed(tp, pp)
        save_megatron_checkpoint(hf / name, ckpt, torch.float32)
        parallel_state.destroy_model_parallel()
        log(f"{name}: saved at {layout}")

    init_distributed(1, 1)
    for name, layout in CONVERSIONS:
        ckpt = megatron / f"{name}_{layout}"
        if rank0:
            export_megatron_to_hf(ckpt, export / f"{name}_{layout}", ckpt / HF_FILES, max_shard_bytes=SHARD_BYTES)
        difference = logit_difference(hf / name, ckpt).largest
        assert difference <= TOLERANCE, f"{name} {layout}: max |logit difference| {difference:.3e} > {TOLERANCE}"
        log(f"{name} {layout}: exported; max |logit difference| {difference:.3e}")
    other = logit_difference(hf / "qwen3_tied_other_seed", megatron / "qwen3_tied_tp2").largest
    assert other > 1e-2, f"a different model's logits differ by only {other:.3e}"
    log(f"negative control: max |logit difference| vs another model {other:.3e}")
    parallel_state.destroy_model_parallel()

    init_distributed(2, 1)
    last_layout = {name: layout for name, layout in CONVERSIONS}
    for name, (_, config) in TINY_MODELS.items():
        model = build_gpt_model(config, 2, 1, params_dtype=torch.float32)
        load_model_weights(megatron / f"{name}_{last_layout[name]}", [model])
        exported, source = export_hf_state_dict(model), hf_state(hf / name)
        source.pop("lm_head.weight", None) if config.tie_word_embeddings else None
        assert exported.keys() == source.keys(), f"{name}: {sorted(exported.keys() ^ source.keys())}"
        unequal = [key for key in source if not torch.equal(exported[key], source[key])]
        assert not unequal, f"{name}: {last_layout[name]} checkpoint loaded at TP=2 differs in {unequal}"
        log(f"{name}: {last_layout[name]} checkpoint loaded at TP=2 equals the source")
    log("CONVERT OK")
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
