"""`opsdc`: the command line. `opsdc demo` runs the embedded default; `opsdc train RECIPE [key=value ...]` any recipe;
`opsdc eval` measures a model on a benchmark; `opsdc report RUN_DIR` renders a run.

Input errors (recipe, prompts, parallel layout) are checked before any process group starts or any
file is written, and reported as one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

from opsdc_megatron import plan
from opsdc_megatron.config import ConfigError, RunConfig, load_config
from opsdc_megatron.convert import cli as convert_cli
from opsdc_megatron.eval.command import add_parser as add_eval_parser
from opsdc_megatron.eval.datasets import add_data_parser
from opsdc_megatron.files import check_output_folder
from opsdc_megatron.prompts import PromptFileError
from opsdc_megatron.report import add_parser as add_report_parser
from opsdc_megatron.train.preemption import PREEMPTED_EXIT_CODE, STOP_FILE_ENV, PreemptionWatch

INPUT_ERRORS = (ConfigError, PromptFileError, ValueError, FileNotFoundError)
"""What a bad recipe, model folder or prompt file raises during preflight."""
INPUTS_CHECKED_ENV = "OPSDC_INPUTS_CHECKED"
"""Set to 1 by the launchers that ran `preflight` before starting the ranks (opsdc train's own torchrun, the SLURM
job script, the nemo-run launcher), so that each rank does not repeat it; under another launcher every rank runs it."""


def preflight(config: RunConfig) -> None:
    """Everything that can be checked without a process group: model config vs layout, prompts. Without
    megatron-core, which every trainer process imports anyway (seconds each launch)."""
    hf_path = Path(config.model.hf_path)
    if not (hf_path / "config.json").is_file():  # before the imports (seconds), so a wrong path fails at once
        raise FileNotFoundError(f"model.hf_path: {hf_path} has no config.json")
    from transformers import AutoConfig

    from opsdc_megatron.models.hf_config import check_hf_config
    from opsdc_megatron.prompts import load_prompts, load_tokenizer
    from opsdc_megatron.train.prompt_stream import PromptStream

    parallel = config.parallel
    try:
        hf_config = AutoConfig.from_pretrained(hf_path)
    except OSError as error:  # what transformers raises for an unreadable or malformed config.json
        raise ValueError(f"model.hf_path: {hf_path / 'config.json'}: {error}") from None
    try:
        check_hf_config(hf_config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.virtual_pipeline_chunks)
    except ValueError as error:  # e.g. `num_attention_heads: expected a multiple of tensor_parallel_size = 3, got 4`
        raise ValueError(f"model.hf_path: {hf_path / 'config.json'}: {error}") from None
    if config.model.megatron_checkpoint:
        from opsdc_megatron.convert.checks import check_megatron_checkpoint

        check_megatron_checkpoint(Path(config.model.megatron_checkpoint))
    else:  # the weights come from the folder: their names and shapes must match its config (headers only)
        from opsdc_megatron.convert.checks import check_hf_folder

        try:
            check_hf_folder(hf_path)
        except ValueError as error:
            raise ValueError(f"model.hf_path: {error}") from None
    from opsdc_megatron.train.run_folder import resume_point

    out_dir = Path(config.out_dir)
    check_output_folder(out_dir, "out_dir")
    resume_point(out_dir, config.checkpoint.resume, config.train.steps)
    PromptStream(load_prompts(config.data.train_prompts), load_tokenizer(hf_path), config)
    if config.data.eval_prompts:
        load_prompts(config.data.eval_prompts)


def check_local_gpus(config: RunConfig) -> None:
    """Without a launcher every rank runs on this machine, each on a GPU of its own where there are GPUs: more
    ranks than GPUs failed one by one in torch.cuda.set_device, after each had spent seconds importing."""
    import torch

    gpus, p = torch.cuda.device_count(), config.parallel
    if gpus and config.world_size > gpus:
        raise ValueError(
            f"the layout needs {config.world_size} processes, one GPU each (parallel: tensor {p.tensor_parallel_size} x pipeline "
            f"{p.pipeline_parallel_size} x data {p.data_parallel_size}), and this machine has {gpus} GPUs: launch it across nodes "
            "(slurm/*.sbatch, python -m opsdc_megatron.launch) or choose a smaller layout"
        )


def train_command(recipe: str, overrides: list[str]) -> None:
    under_launcher = "LOCAL_RANK" in os.environ
    preemption = PreemptionWatch()  # first: a stop signal during the checks below is recorded, not fatal
    try:
        config = load_config(recipe, overrides)
        if os.environ.get(INPUTS_CHECKED_ENV) != "1":
            preflight(config)
        if not under_launcher:
            check_local_gpus(config)
            from opsdc_megatron.launch.plan import check_sglang_servers_to_start

            check_sglang_servers_to_start(config)
    except INPUT_ERRORS as error:
        print(f"opsdc train: error: {error}", file=sys.stderr)
        sys.exit(2)
    if under_launcher or config.world_size == 1:
        from opsdc_megatron.train.loop import run

        run(config, preemption)
        return
    _start_workers(config.world_size, recipe, overrides, preemption)


def _start_workers(world_size: int, recipe: str, overrides: list[str], preemption: PreemptionWatch) -> None:
    """One trainer process per rank on this machine, through torchrun. torchrun starts them in sessions
    of their own, out of reach of a signal to this process: a stop signal here reaches them through their
    stop file (train/preemption.py); they checkpoint and exit 75, and so does this process."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    with tempfile.TemporaryDirectory(prefix="opsdc-stop-") as folder:
        stop_file = Path(folder) / "stop_requested"
        preemption.forward_to(stop_file)
        os.environ[STOP_FILE_ENV] = str(stop_file)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ[INPUTS_CHECKED_ENV] = "1"  # for the workers only: a later command in this process checks its own
        try:  # torchrun leaves the stop signals to the watch: its own handler would kill the workers
            torchrun([f"--nproc-per-node={world_size}", "--standalone", "--signals-to-handle=SIGINT,SIGQUIT",
                      "-m", "opsdc_megatron.cli", "train", recipe, *overrides])
        except ChildFailedError as error:
            exit_codes = {failure.exitcode for failure in error.failures.values()}
            if PREEMPTED_EXIT_CODE in exit_codes and exit_codes <= {PREEMPTED_EXIT_CODE, -signal.SIGTERM}:
                sys.exit(PREEMPTED_EXIT_CODE)  # stopped on request after a checkpoint (torchrun may end the last ranks)
            raise
        finally:
            del os.environ[INPUTS_CHECKED_ENV]


def demo_command(args: argparse.Namespace) -> None:
    from subprocess import CalledProcessError

    from opsdc_megatron.demo import check_demo_inputs, default_cache, run_demo

    overrides = [f"rollout.engine={args.rollout}", *args.overrides]
    cache = Path(args.cache) if args.cache else default_cache()
    try:
        check_demo_inputs(Path(args.out), cache, overrides)
    except INPUT_ERRORS as error:
        print(f"opsdc demo: error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        run_demo(Path(args.out), cache, overrides)
    except CalledProcessError as error:
        print(f"opsdc demo: opsdc train failed with exit status {error.returncode} (its output is above)", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opsdc", description=__doc__.split("\n\n")[0].replace("\n", " "))
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build the toy base model, run OPSDC at TP=2 on CPU, compare before/after")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--cache", default=None, help="where the toy base model is cached (default: ~/.cache/opsdc-megatron)")
    demo.add_argument("--rollout", choices=("hf", "sglang"), default="hf", help="rollout engine: in-process transformers (default) or a local SGLang server (make env-sglang)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of recipes/toy_cpu.yaml, e.g. train.steps=20")
    train = commands.add_parser("train", help="run OPSDC from a recipe")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/toy_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    plan.add_parser(commands)
    convert_cli.add_parser(commands)
    add_eval_parser(commands)
    add_data_parser(commands)
    add_report_parser(commands)
    args = parser.parse_args(argv)
    if args.command in ("convert", "eval"):  # megatron-core's import-time notes bury these commands' one-line errors
        warnings.filterwarnings("ignore", message=r"(Apex is|Transformer Engine and Apex are) not installed", category=UserWarning)
    if args.command == "convert":
        convert_cli.run(args)  # maps conversion errors to exit statuses around the subcommand's handler
    elif hasattr(args, "handler"):
        args.handler(args)
    elif args.command == "demo":
        demo_command(args)
    else:
        train_command(args.recipe, args.overrides)


if __name__ == "__main__":
    main()
