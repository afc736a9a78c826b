"""The training checkpoint's save: megatron-core's own torch_dist writer against ours, in the same run.

Both write the same format (megatron's keys, planner and metadata); they differ in who writes.
megatron's `FileSystemWriterAsync` starts a "spawn" multiprocessing Manager on its first save and
forks writer processes on every save, also for a synchronous one; `InProcessTorchDistSave`
(opsdc_megatron/torch_dist_save.py) writes with torch's `FileSystemWriter` from this process, which
the trainer needs: a fork from its threads can hang the child. This bench measures what that costs or
saves.

What is saved is the trainer's whole state as a save after a teacher refresh writes it (`train/checkpoint`: the
checkpoint's student and AdamW state and the teacher folder's snapshot, here in one folder): of a random Qwen3 (``--hidden``, ``--layers``, ``--vocab``), fp32,
at tensor parallel size 2 (two gloo processes started with torchrun). Saves alternate between the two
writers, ``--saves`` each; the first save of each is reported apart (megatron's Manager starts
there), then the median of the rest, and our time as a ratio to megatron's. Each writer's last
checkpoint is loaded back and checked equal to the model it was saved from.

Usage: ``python bench/checkpoint.py [--hidden 512] [--layers 4] [--vocab 32000] [--saves 4] [--work DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITERS = ("megatron", "in_process")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--saves", type=int, default=4, help="saves per writer (>= 2)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the model and checkpoints (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def write_model(folder: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8, tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).save_pretrained(folder)


def worker(args: argparse.Namespace) -> None:
    """One of the two torchrun ranks: builds the trainer's model, saves with both writers, checks."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from opsdc_megatron.config import ParallelConfig, TrainConfig
    from opsdc_megatron.parallel import destroy_distributed, init_distributed
    from opsdc_megatron.torch_dist_save import InProcessTorchDistSave
    from opsdc_megatron.train.build import build_training_model
    from opsdc_megatron.train.checkpoint import _sharded_state_dict, _teacher_sharded_state_dict

    torch.set_num_threads(1)
    init_distributed(tensor_parallel_size=2)
    model_dir, work = args.work / "model", args.work / "checkpoints"
    model = build_training_model(AutoConfig.from_pretrained(model_dir), str(model_dir), ParallelConfig(tensor_parallel_size=2),
                                 torch.float32, TrainConfig(), teacher_refresh_every=10)
    for ddp in model.ddps:  # an optimizer step on zero gradients: AdamW's state exists, as in a running trainer
        ddp.zero_grad_buffer()
    model.optimizer.step()

    def save(writer: str, folder: Path) -> float:
        if dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        dist.barrier()
        started = time.perf_counter()
        state = {**_sharded_state_dict(model.ddps, model.optimizer, is_loading=False), **_teacher_sharded_state_dict(model.teacher)}
        dist_checkpointing.save(state, str(folder), sharded_strategy=InProcessTorchDistSave() if writer == "in_process" else None)
        dist.barrier()
        return time.perf_counter() - started

    seconds: dict[str, list[float]] = {writer: [] for writer in WRITERS}
    for repeat in range(args.saves):
        for writer in WRITERS if repeat % 2 == 0 else reversed(WRITERS):
            seconds[writer].append(save(writer, work / writer))

    for writer in WRITERS:  # each writer's checkpoint loads back to the model's weights
        loaded = dist_checkpointing.load({"model": [ddp.module.sharded_state_dict() for ddp in model.ddps]}, str(work / writer))
        for ddp, state in zip(model.ddps, loaded["model"]):
            for name, tensor in ddp.module.state_dict().items():
                if not name.endswith("_extra_state"):
                    assert torch.equal(state[name], tensor), f"{writer}: {name} differs after load"
    if dist.get_rank() == 0:
        size_bytes = sum(f.stat().st_size for f in (work / "in_process").rglob("*") if f.is_file())
        print("RESULT " + json.dumps({"seconds": seconds, "checkpoint_bytes": size_bytes}), flush=True)
    destroy_distributed()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.saves < 2:
        sys.exit("--saves must be >= 2 (the first save of each writer is reported apart)")
    with tempfile.TemporaryDirectory() as scratch:
        args.work = args.work or Path(scratch)
        write_model(args.work / "model", args)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", str(Path(__file__).resolve()), "--worker",
            f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}", f"--saves={args.saves}", f"--work={args.work}",
        ]
        proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        if proc.returncode != 0:
            sys.exit(f"the bench's ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    seconds = result["seconds"]
    print(f"trainer state at TP=2 (student + AdamW + teacher, fp32): {result['checkpoint_bytes'] / 1e6:.0f} MB on disk")
    print(f"{'writer':<12} {'first save s':>13} {'median later s':>15} {'MB/s later':>11}")
    medians = {writer: statistics.median(seconds[writer][1:]) for writer in WRITERS}
    for writer in WRITERS:
        rate = result["checkpoint_bytes"] / 1e6 / medians[writer]
        print(f"{writer:<12} {seconds[writer][0]:>13.2f} {medians[writer]:>15.2f} {rate:>11.0f}")
    print(f"in_process / megatron: first save {seconds['in_process'][0] / seconds['megatron'][0]:.2f}x, "
          f"later saves {medians['in_process'] / medians['megatron']:.2f}x")


if __name__ == "__main__":
    main()
